"""The gateway in front of the real inference service (tiny random model, gibberish text)."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import grpc
import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI
from media_samples import png_bytes, png_data_uri, wav_bytes

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc

MODEL = "autoglm-phone-9b"
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def client(real_gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{real_gateway_url}/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="module")
def context_length(inference_server: Any) -> int:
    with grpc.insecure_channel(inference_server.target) as channel:
        info = pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    return info.context_length


def user(content: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": content}]


def test_health_is_serving(real_gateway_url: str) -> None:
    response = httpx.get(f"{real_gateway_url}/health")

    assert (response.status_code, response.json()["status"]) == (200, "SERVING")


def test_streamed_and_whole_answers_agree_and_report_usage(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "messages": user("Say something."),
        "max_tokens": 12,
        "temperature": 0,
        "seed": 7,
    }

    whole = client.chat.completions.create(**params)
    chunks = list(
        client.chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
    )

    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.id.startswith("chatcmpl-")
    assert streamed_text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in {"stop", "length"}
    assert whole.usage is not None and chunks[-1].usage is not None
    assert 0 < whole.usage.completion_tokens <= 12
    assert whole.usage.prompt_tokens > 0
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].choices == []


def test_a_near_zero_temperature_is_greedy_and_the_service_keeps_serving(
    client: openai.OpenAI,
) -> None:
    params: dict[str, Any] = {"model": MODEL, "messages": user("Good morning"), "max_tokens": 8,
                              "extra_body": {"min_tokens": 8}}

    tiny = client.chat.completions.create(**params, temperature=1e-38)
    greedy = client.chat.completions.create(**params, temperature=0)
    after = client.chat.completions.create(**params, temperature=0.7, seed=1)

    assert tiny.choices[0].message.content == greedy.choices[0].message.content
    assert after.usage is not None and after.usage.completion_tokens == 8


def test_max_tokens_is_honoured(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=user("Count."), max_tokens=5, extra_body={"min_tokens": 5}
    )

    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_stop_sequence_cuts_the_answer_before_it(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {
        "model": MODEL,
        "messages": user("Say something."),
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": {"min_tokens": 24},
    }
    text = client.chat.completions.create(**params).choices[0].message.content or ""
    assert len(text) >= 8, "the greedy answer is too short to pick a stop sequence from"
    stop = text[5:8]

    stopped = client.chat.completions.create(**params, stop=[stop])

    assert stopped.choices[0].message.content == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_png_image_adds_prompt_tokens(client: openai.OpenAI) -> None:
    data_uri = png_data_uri(png_bytes())
    text_only = client.chat.completions.create(
        model=MODEL, messages=user("What is this?"), max_tokens=2
    )
    with_image = client.chat.completions.create(
        model=MODEL,
        messages=user(
            [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": data_uri}},
            ]
        ),
        max_tokens=2,
    )

    assert text_only.usage is not None and with_image.usage is not None
    assert with_image.usage.prompt_tokens > text_only.usage.prompt_tokens


def test_wav_audio_is_accepted(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=user(
            [
                {"type": "text", "text": "Transcribe."},
                {
                    "type": "input_audio",
                    "input_audio": {
                        "data": base64.b64encode(wav_bytes()).decode(),
                        "format": "wav",
                    },
                },
            ]
        ),
        max_tokens=2,
    )

    assert completion.usage is not None and completion.usage.prompt_tokens > 0


def test_the_reference_langchain_snippet_runs(real_gateway_url: str) -> None:
    chat = ChatOpenAI(
        model="autoglm-phone-9b",
        temperature=0.5,
        base_url=f"{real_gateway_url}/v1",
        api_key="EMPTY",
        extra_body={"enable_thinking": True, "return_reasoning": True},
        streaming=True,
        max_tokens=16,
    )

    answer = chat.invoke("你是谁?")

    assert isinstance(answer.content, str)
    assert answer.response_metadata.get("finish_reason") in {"stop", "length"}


def test_invalid_image_bytes_are_a_400_from_the_service(client: openai.OpenAI) -> None:
    not_a_png = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()

    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL,
            messages=user([{"type": "image_url", "image_url": {"url": not_a_png}}]),
            max_tokens=2,
        )

    assert raised.value.status_code == 400


def test_disconnect_mid_stream_cancels_the_generation_in_the_service(
    real_gateway_url: str, inference_server: Any, context_length: int
) -> None:
    request_id = f"gw-disconnect-{uuid.uuid4().hex[:8]}"
    # min_tokens keeps the random model from stopping at an early end-of-sequence.
    long_generation = context_length - 64
    body = {
        "model": MODEL,
        "messages": user("Write forever."),
        "stream": True,
        "max_tokens": long_generation,
        "min_tokens": long_generation,
    }

    with (
        httpx.Client(base_url=real_gateway_url, timeout=60) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"x-request-id": request_id}
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")

    finished = inference_server.wait_for_log("generation_finished", request_id)
    assert finished["finish_reason"] == "cancelled"
    assert finished["completion_tokens"] < long_generation


def test_n_choices_come_back_whole_with_their_indexes_and_usage_counting_each(
    client: openai.OpenAI,
) -> None:
    params: dict[str, Any] = {"model": MODEL, "messages": user("Name a fruit."),
                              "max_tokens": 10, "temperature": 1.0, "seed": 3}
    single = client.chat.completions.create(**params)
    reply = client.chat.completions.create(**params, n=3, logprobs=True)

    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.finish_reason in {"stop", "length"} for c in reply.choices)
    assert reply.choices[0].message.content == single.choices[0].message.content
    assert len({c.message.content for c in reply.choices}) > 1  # sampled: they differ
    per_choice = [len(c.logprobs.content) for c in reply.choices]  # one entry per token
    assert reply.usage is not None and single.usage is not None
    assert reply.usage.completion_tokens == sum(per_choice)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt once


def test_n_choices_stream_with_their_indexes_and_each_finishes(client: openai.OpenAI) -> None:
    params: dict[str, Any] = {"model": MODEL, "messages": user("Name a city."),
                              "max_tokens": 8, "temperature": 1.0, "seed": 11, "n": 3}
    whole = client.chat.completions.create(**params)
    chunks = list(client.chat.completions.create(
        **params, stream=True, stream_options={"include_usage": True}))

    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finished  # nothing after a choice's finish
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert [finished[i] for i in range(3)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_above_the_limit_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=user("hi"), n=9)
    assert info.value.body["param"] == "n"
