"""The phone agent's messages, and the prompt vLLM renders from them, for rendering tests.

The messages have the shape of Open-AutoGLM's (`phone_agent/agent.py`, `MessageBuilder`):
a system prompt of several paragraphs as a plain string; each step's user turn a list of
an `image_url` screenshot then a text; earlier user turns stripped of their images (a
list of one text part); earlier replies returned as `<think>...</think><answer>...</answer>`.

`vllm_prompt` is the reference: what vLLM serving the agent's documented deployment
(`--chat-template-content-format string`) hands the checkpoint's chat template, rendered
through transformers' `apply_chat_template` and tokenized as vLLM does (no special tokens
added), each image placeholder expanded to the image's feature count.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from PIL import Image

from inference_svc.types import ChatMessage, ImagePart, TextPart

SYSTEM_PROMPT = (
    "The current date: 2025-12-12, Friday\n"
    "# Setup\n"
    "You are an agent that operates an Android phone for the user. Each step you get a "
    "screenshot of the screen and a short description of it; you look at the screen, "
    "think about what the user asked for, and choose one action.\n\n"
    "# Output format\n"
    "Think first, inside <think>...</think>, then give exactly one action inside "
    "<answer>...</answer>:\n"
    "<think>\n[what you see and why]\n</think>\n<answer>\n[one action]\n</answer>\n\n"
    "# Actions\n"
    '- do(action="Launch", app="Settings"): open an app by name.\n'
    '- do(action="Tap", element=[x,y]): tap the point (x, y), both from 0 to 999.\n'
    '- do(action="Type", text="Hello World"): type into the focused field.\n'
    '- do(action="Swipe", start=[x1,y1], end=[x2,y2]): swipe between two points.\n'
    '- do(action="Back"), do(action="Home"), do(action="Wait", duration="2 seconds").\n'
    '- finish(message="..."): the task is done; say what was done.\n\n'
    "# Rules\n"
    "1. Before anything else, check that the app the task needs is in the foreground.\n"
    "2. If a page does not load, wait once, then go back and try another way.\n"
    "3. Never type into a field you have not tapped first.\n"
) * 3
TASK = "Open the settings and turn on Wi-Fi."


def screenshot_png(shade: int, size: tuple[int, int] = (1080, 2400)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (shade, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def user_turn(text: str, image: bytes | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        url = "data:image/png;base64," + base64.b64encode(image).decode()
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def agent_step_messages(step: int, replies: list[str]) -> list[dict[str, Any]]:
    """The messages of step `step` (0-based): every earlier step's user turn without its
    image and `replies[i]` after it, then this step's turn with its screenshot."""
    screen = json.dumps({"current_app": "System Home"}, ensure_ascii=False)
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for index in range(step + 1):
        text = f"{TASK}\n\n{screen}" if index == 0 else f"** Screen Info **\n\n{screen}"
        image = screenshot_png(40 * index) if index == step else None
        messages.append(user_turn(text, image))
        if index < step:
            messages.append({"role": "assistant", "content": replies[index]})
    return messages


def as_chat_messages(messages: list[dict[str, Any]]) -> list[ChatMessage]:
    """The OpenAI messages as the service's own (what the gateway sends over gRPC)."""
    converted = []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts: list[TextPart | ImagePart] = []
        for j, part in enumerate(content):
            if part["type"] == "text":
                parts.append(TextPart(part["text"]))
            else:
                data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                parts.append(ImagePart(data, "image/png", f"messages[{i}].parts[{j}].image"))
        converted.append(ChatMessage(message["role"], parts))
    return converted


def vllm_string_content(content: str | list[dict[str, Any]], placeholder: str) -> str:
    """vLLM's string content format: text parts joined by newlines, one placeholder per
    image before them, each joined by a newline."""
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if part["type"] == "text"]
    images = sum(part["type"] == "image_url" for part in content)
    text = "\n".join(texts)
    return "\n".join([placeholder] * images + ([text] if text else []))


def vllm_prompt(tokenizer, messages: list[dict[str, Any]], image_tokens: list[int],
                image_token_id: int) -> list[int]:
    placeholder = "<|begin_of_image|><|image|><|end_of_image|>"
    chat = [{"role": m["role"], "content": vllm_string_content(m["content"], placeholder)}
            for m in messages]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    expanded: list[int] = []
    counts = iter(image_tokens)
    for token in ids:
        expanded += [token] * next(counts) if token == image_token_id else [token]
    return expanded


def first_difference(ours: list[int], reference: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=False)) if a != b),
              min(len(ours), len(reference)))
    return (f"ours {len(ours)} tokens, reference {len(reference)}; first difference at "
            f"{at}: {ours[at:at + 8]} vs {reference[at:at + 8]}")
