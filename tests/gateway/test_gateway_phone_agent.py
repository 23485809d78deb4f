"""The AutoGLM phone agent's request and parsing code against the gateway and GLM-4.1V.

The model is a tiny GLM-4.1V rigged to reply in GLM-4.1V's format
(`<think>...</think><answer>...</answer>`); the client side reproduces zai-org/Open-AutoGLM
`phone_agent/model/client.py` (streamed request, marker buffering on `delta.content`,
`_parse_response`), `phone_agent/agent.py` (image stripping, assistant history) and the
`do(...)` / `finish(...)` parsing of `phone_agent/actions/handler.py`.
"""

from __future__ import annotations

import ast
import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from gateway_harness import openai_through_gateway
from PIL import Image

from tests.conftest import ServerProcess, start_server
from tests.scripted_glm4v import ACTION, THOUGHT, write_scripted_glm4v_checkpoint

pytestmark = pytest.mark.timeout(300)
MODEL = "autoglm-phone-9b"
SYSTEM_PROMPT = "You are a professional Android operation agent assistant. " * 44  # ~2.6k chars
ACTION_MARKERS = ["finish(message=", "do(action="]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    checkpoint = write_scripted_glm4v_checkpoint(tmp_path_factory.mktemp("scripted") / "glm4v")
    process = start_server(tmp_path_factory.mktemp("scripted-server"), checkpoint,
                           "--min-new-tokens", "0")
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai_through_gateway(server.target) as client:
        yield client


def screenshot_base64(shade: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (1080, 2400), (shade, 120, 200)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- the phone agent's client code, reproduced -----------------------------------------


def agent_request(client: openai.OpenAI, messages: list[dict[str, Any]],
                  extra_body: dict[str, Any]) -> tuple[str, list[str]]:
    """ModelClient.request: stream, accumulate delta.content, buffer around the action
    markers; returns the raw content and what it would have printed as thinking."""
    stream = client.chat.completions.create(
        messages=messages, model=MODEL, max_tokens=3000, temperature=0.0, top_p=0.85,
        frequency_penalty=0.2, extra_body=extra_body, stream=True)
    raw_content = buffer = ""
    printed: list[str] = []
    in_action_phase = False
    for chunk in stream:
        if len(chunk.choices) == 0 or chunk.choices[0].delta.content is None:
            continue
        content = chunk.choices[0].delta.content
        raw_content += content
        if in_action_phase:
            continue
        buffer += content
        marker = next((m for m in ACTION_MARKERS if m in buffer), None)
        if marker is not None:
            printed.append(buffer.split(marker, 1)[0])
            in_action_phase = True
            continue
        if not any(buffer.endswith(m[:i]) for m in ACTION_MARKERS for i in range(1, len(m))):
            printed.append(buffer)
            buffer = ""
    return raw_content, printed


def parse_response(content: str) -> tuple[str, str]:
    """ModelClient._parse_response: the action markers first, <answer> second."""
    if "finish(message=" in content:
        parts = content.split("finish(message=", 1)
        return parts[0].strip(), "finish(message=" + parts[1]
    if "do(action=" in content:
        parts = content.split("do(action=", 1)
        return parts[0].strip(), "do(action=" + parts[1]
    if "<answer>" in content:
        parts = content.split("<answer>", 1)
        thinking = parts[0].replace("<think>", "").replace("</think>", "").strip()
        return thinking, parts[1].replace("</answer>", "").strip()
    return "", content


def parse_action(response: str) -> dict[str, Any]:
    """actions/handler.parse_action for do(...) and finish(...)."""
    response = response.strip()
    if response.startswith("do"):
        call = ast.parse(response.replace("\n", "\\n"), mode="eval").body
        assert isinstance(call, ast.Call)
        return {"_metadata": "do",
                **{k.arg: ast.literal_eval(k.value) for k in call.keywords}}
    if response.startswith("finish"):
        return {"_metadata": "finish", "message": response.replace("finish(message=", "")[1:-2]}
    raise ValueError(f"Failed to parse action: {response}")


def user_message(text: str, image_base64: str | None) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image_base64:
        content.append({"type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{image_base64}"}})
    content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def run_agent(client: openai.OpenAI, steps: int, extra_body: dict[str, Any]
              ) -> list[tuple[str, str, dict[str, Any]]]:
    """PhoneAgent's loop: a screenshot per step, images stripped from earlier turns,
    the assistant's turn stored as <think>{thinking}</think><answer>{action}</answer>."""
    context: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    results = []
    for step in range(steps):
        screen_info = json.dumps({"current_app": "System Home"}, ensure_ascii=False)
        text = (f"Open the settings\n\n{screen_info}" if step == 0
                else f"** Screen Info **\n\n{screen_info}")
        context.append(user_message(text, screenshot_base64(40 * step)))
        raw, _ = agent_request(client, context, extra_body)
        thinking, action = parse_response(raw)
        results.append((raw, thinking, parse_action(action)))
        context[-1]["content"] = [i for i in context[-1]["content"] if i.get("type") == "text"]
        context.append({"role": "assistant",
                        "content": f"<think>{thinking}</think><answer>{action}</answer>"})
    return results


# ---- what the service sends in each mode -------------------------------------------------


LAUNCH = {"_metadata": "do", "action": "Launch", "app": "Settings"}


def test_phone_agent_as_shipped_completes_three_steps(client):
    """No extra_body (the agent's default): reasoning is dropped, the answer tags are
    markup, so delta.content is the bare action the agent's parser executes."""
    for raw, thinking, action in run_agent(client, 3, extra_body={}):
        assert raw == ACTION
        assert thinking == ""
        assert action == LAUNCH


def test_with_return_reasoning_the_thought_arrives_beside_the_content(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[user_message("Open the settings", screenshot_base64(0))],
        max_tokens=64, temperature=0.0, stream=True, stream_options={"include_usage": True},
        extra_body={"enable_thinking": True, "return_reasoning": True})
    content = reasoning = ""
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
    assert (reasoning, content) == (THOUGHT, ACTION)
    assert usage is not None and usage.completion_tokens_details.reasoning_tokens >= 1
    assert parse_action(parse_response(content)[1]) == LAUNCH


def test_phone_agent_with_return_reasoning_also_completes_its_steps(client):
    for raw, _, action in run_agent(client, 3, extra_body={"return_reasoning": True}):
        assert raw == ACTION
        assert action == LAUNCH


def test_enable_thinking_reaches_the_chat_template(client):
    """GLM-4.1V's template closes an empty <think></think> when thinking is off."""
    def prompt_tokens(enable_thinking: bool) -> int:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1,
            temperature=0.0, extra_body={"enable_thinking": enable_thinking})
        return reply.usage.prompt_tokens

    assert prompt_tokens(False) == prompt_tokens(True) + 3  # <think>, </think>, "\n"

