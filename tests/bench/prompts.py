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
