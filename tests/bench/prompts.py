"""Benchmark conversations, in OpenAI message shape ({"role", "content"})."""

from __future__ import annotations

import random

AGENT_SYSTEM = (
    "You are a phone-operating agent. Each turn you receive the current screen as a list "
    "of interface elements with their ids, and you answer with one action: tap(id), "
    "type(id, text), swipe(direction), back(), home() or finish(message). Think about the "
    "user's goal, pick the element that moves towards it, and keep answers short."
)

TASK = (
    "Open the calendar app, find next Tuesday's dentist appointment, move it one hour "
    "later, and send a message to Dr. Alvarez's office confirming the new time. Explain "
    "briefly which screens you expect to pass through and what you will tap on each."
)

_APPS = ["Calendar", "Messages", "Settings", "Maps", "Mail", "Photos", "Clock", "Contacts",
         "Notes", "Weather", "Music", "Files", "Wallet", "Camera", "Browser", "Phone"]
_KINDS = ["button", "text", "list item", "icon", "toggle", "input field", "tab", "link"]
_WORDS = ["appointment", "Tuesday", "reminder", "edit", "save", "cancel", "repeat", "alert",
          "location", "invitees", "notes", "all-day", "starts", "ends", "time zone", "travel",
          "search", "today", "week", "month", "settings", "share", "delete", "duplicate"]


def single_turn(tag: str) -> list[dict[str, str]]:
    """One user request; `tag` leads the system message so no cached prefix matches."""
    return [{"role": "system", "content": f"{tag} {AGENT_SYSTEM}"},
            {"role": "user", "content": TASK}]


def screen_observation(step: int, elements: int, rng: random.Random) -> str:
    """A fabricated screen description, the text part of one phone-agent step."""
    lines = [f"Step {step}. Current app: {rng.choice(_APPS)}. Screen elements:"]
    for index in range(elements):
        words = " ".join(rng.sample(_WORDS, 3))
        lines.append(f"[{index}] {rng.choice(_KINDS)} '{words}' at ({rng.randint(0, 1080)}, "
                     f"{rng.randint(0, 2400)})")
    lines.append("What is your next action?")
    return "\n".join(lines)


# The phone agent's English system prompt is about 2.6k characters: the date, how to
# answer, the action set and the rules. This one is written for the benchmarks to the
# same length and layout (its wording is ours).
PHONE_AGENT_SYSTEM = """The current date: 2025-06-03, Tuesday
# Setup
You are a professional Android operation agent assistant that can fulfill the user's \
high-level instructions. Given a screenshot of the Android interface at each step, you \
first analyze the situation, then plan the best course of action using Python-style \
pseudo-code.

# More details about the code
Your response format must be structured as follows:
<think>
[Your thought]
</think>
<answer>
[Your operation code]
</answer>

- **Tap**
  Perform a tap action on a specified screen area. The element is a list of 2 integers, \
representing the coordinates of the tap point.
  **Example**: do(action="Tap", element=[x,y])
- **Type**
  Enter text into the currently focused input field.
  **Example**: do(action="Type", text="Hello World")
- **Swipe**
  Perform a swipe action with start point and end point.
  **Examples**: do(action="Swipe", start=[x1,y1], end=[x2,y2])
- **Long Press**
  Perform a long press action on a specified screen area.
  **Example**: do(action="Long Press", element=[x,y])
- **Launch**
  Launch an app. Try to use launch action when you need to launch an app.
  **Example**: do(action="Launch", app="Settings")
- **Back**
  Press the Back button to navigate to the previous screen.
  **Example**: do(action="Back")
- **Home**
  Press the Home button to return to the home screen.
  **Example**: do(action="Home")
- **Wait**
  Wait for the screen to load or for an animation to finish.
  **Example**: do(action="Wait", duration="2 seconds")
- **Take_over**
  Hand control to the user when a login, payment or captcha needs a person.
  **Example**: do(action="Take_over", message="Please log in")
- **Finish**
  Terminate the program and optionally print a message.
  **Example**: finish(message="Task completed.")

REMEMBER:
- Think before you act: Always analyze the current UI and the best course of action \
before executing any step, and output in <think> part.
- Only ONE LINE of action in <answer> part per response: Each step must contain exactly \
one line of executable code.
- Generate execution code strictly according to format requirements.
- Coordinates are relative: (0,0) is the top left and (1000,1000) the bottom right of \
the screen, whatever its resolution.
- If the screen has not changed after an action, the action may have missed: try a \
slightly different position, or wait for the page to load before you act again.
- If the wanted app is not installed, or a page keeps failing to load after three tries, \
finish with a message that says so instead of looping.
- Before you finish, check that every part of the user's request has been carried out, \
and say what was done in the finish message.
"""
