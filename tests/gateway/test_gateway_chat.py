"""Chat completions through a real gateway, against the gRPC test double."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from media_samples import png_bytes, png_data_uri, wav_bytes

from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.support.fake_inference import REPLY_USAGE, FakeInferenceService, reply

MODEL = "autoglm-phone-9b"


@pytest.fixture
def client(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="EMPTY", max_retries=0)


def test_non_streaming_reply_carries_text_reasoning_usage_and_request_id(
    client: openai.OpenAI, fake_service: FakeInferenceService
) -> None:
    fake_service.script = reply(["Hel", "lo"], reasoning_pieces=("think", "ing"))

    completion = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-request-id": "req-123"},
        extra_body={"enable_thinking": True, "return_reasoning": True},
    )

    assert completion.id == "chatcmpl-req-123"
    assert fake_service.request_ids == ["req-123"]
    choice = completion.choices[0]
    assert choice.message.content == "Hello"
    assert choice.message.model_extra["reasoning_content"] == "thinking"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == REPLY_USAGE.prompt_tokens
    assert completion.usage.completion_tokens == REPLY_USAGE.completion_tokens
    assert (
        completion.usage.total_tokens == REPLY_USAGE.prompt_tokens + REPLY_USAGE.completion_tokens
    )
    assert completion.usage.prompt_tokens_details.cached_tokens == REPLY_USAGE.cached_prompt_tokens
    assert (
        completion.usage.completion_tokens_details.reasoning_tokens == REPLY_USAGE.reasoning_tokens
    )


def test_request_fields_map_onto_generate_request(
    client: openai.OpenAI, fake_service: FakeInferenceService
) -> None:
    client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "again"}]},
        ],
        max_completion_tokens=7,
        temperature=0.3,
        seed=42,
        stop="END",
        extra_body={"session_id": "s-1", "top_k": 5, "repetition_penalty": 1.1},
    )

    (request,) = fake_service.requests
    assert [m.role for m in request.messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_USER,
    ]
    assert request.messages[3].parts[0].text == "again"
    sampling = request.sampling
    assert sampling.max_new_tokens == 7
    assert sampling.temperature == pytest.approx(0.3)
    assert sampling.seed == 42
    assert sampling.top_k == 5
    assert sampling.repetition_penalty == pytest.approx(1.1)
    assert list(sampling.stop_sequences) == ["END"]
    assert not sampling.HasField("top_p")
    assert not sampling.HasField("presence_penalty")
    assert request.session_id == "s-1"
    assert not request.enable_thinking


def test_streaming_with_usage_sends_role_deltas_finish_then_usage(
    client: openai.OpenAI, fake_service: FakeInferenceService
) -> None:
    fake_service.script = reply(["A", "B", "C"], reasoning_pieces=("r1", "r2"))

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"enable_thinking": True, "return_reasoning": True},
        )
    )

    *choice_chunks, usage_chunk = chunks
    assert len({chunk.id for chunk in chunks}) == 1
    assert choice_chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in choice_chunks)
    reasoning = "".join(
        (c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in choice_chunks
    )
    assert content == "ABC"
    assert reasoning == "r1r2"
    assert [c.choices[0].finish_reason for c in choice_chunks][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in choice_chunks[:-1])
    assert all(c.usage is None for c in choice_chunks)
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == REPLY_USAGE.completion_tokens


def test_stream_without_include_usage_has_no_usage_chunk(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    response = httpx.post(f"{gateway_url}/v1/chat/completions", json=body)

    events = [line for line in response.text.split("\n\n") if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]"
    assert all('"usage"' not in event for event in events)


@pytest.mark.parametrize(
    ("finish_reason", "expected"),
    [
        (pb.FINISH_REASON_STOP, "stop"),
        (pb.FINISH_REASON_STOP_SEQUENCE, "stop"),
        (pb.FINISH_REASON_LENGTH, "length"),
    ],
)
def test_finish_reasons_map_to_openai(
    client: openai.OpenAI, fake_service: FakeInferenceService, finish_reason: int, expected: str
) -> None:
    fake_service.script = reply(["x"], finish_reason=finish_reason)

    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )

    assert completion.choices[0].finish_reason == expected


def test_image_and_audio_parts_reach_the_service_as_bytes(
    client: openai.OpenAI, fake_service: FakeInferenceService
) -> None:
    png = png_bytes()
    data_uri = png_data_uri(png)
    wav = wav_bytes()

    client.chat.completions.create(
        model=MODEL,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": data_uri}},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
                    },
                ],
            }
        ],
    )

    parts = fake_service.requests[0].messages[0].parts
    assert [part.WhichOneof("content") for part in parts] == ["text", "image", "audio"]
    assert parts[1].image.data == png
    assert parts[1].image.mime_type == "image/png"
    assert parts[2].audio.wav == wav


def test_langchain_chat_openai_streaming_invoke(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = reply(["我是", "AutoGLM"], reasoning_pieces=("嗯",))
    chat = ChatOpenAI(
        model="autoglm-phone-9b",
        temperature=0.5,
        base_url=f"{gateway_url}/v1",
        api_key="EMPTY",
        extra_body={"enable_thinking": True, "return_reasoning": True},
        streaming=True,
    )

    answer = chat.invoke("你是谁?")

    assert answer.content == "我是AutoGLM"
    (request,) = fake_service.requests
    assert request.messages[0].parts[0].text == "你是谁?"
    assert request.enable_thinking
    assert request.return_reasoning
    assert request.sampling.temperature == pytest.approx(0.5)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
