"""Every error comes back in OpenAI's shape with the right HTTP status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest
from gateway_harness import GatewayFactory
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.support.fake_inference import FakeInferenceService, FakeUpstream, fail, reply

MODEL = "autoglm-phone-9b"
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CLOSED_PORT_TARGET = "127.0.0.1:1"


def post_chat(base_url: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, **kwargs)


def error_of(response: httpx.Response) -> dict[str, Any]:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"response_format": {"type": "grammar"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
         "response_format.json_schema.schema"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "input_audio",
                                "input_audio": {"data": "AAAA", "format": "mp3"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].input_audio.format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}},
         "tool_choice.function.name"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0]"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_invalid_requests_are_400_naming_the_parameter(
    gateway_url: str, fake_service: FakeInferenceService, changes: dict[str, Any], param: str
) -> None:
    response = post_chat(gateway_url, {**BODY, **changes})

    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fake_service.requests == []


def test_malformed_json_is_400(gateway_url: str) -> None:
    response = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )

    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_upstream_invalid_argument_is_400_with_the_field_from_rich_details(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field="messages[0].parts[0].image", description="not an image"
                )
            ]
        )
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="image bytes are not PNG", details=[detail]
    )
    fake_service.script = fail(
        grpc.StatusCode.INVALID_ARGUMENT,
        "image bytes are not PNG",
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )

    response = post_chat(gateway_url, BODY)

    assert response.status_code == 400
    error = error_of(response)
    assert error["message"] == "image bytes are not PNG"
    assert error["param"] == "messages[0].parts[0].image"


def test_wrong_or_missing_api_key_is_401(make_gateway: GatewayFactory) -> None:
    with make_gateway(api_key="s3cret") as url:
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        right = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)

        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.chat.completions.create(model=MODEL, messages=BODY["messages"])
        missing = post_chat(url, BODY)
        completion = right.chat.completions.create(model=MODEL, messages=BODY["messages"])
        health = httpx.get(f"{url}/health")

    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert missing.status_code == 401
    assert completion.choices[0].message.content
    assert health.status_code == 200


def test_unknown_model_is_404(gateway_url: str, fake_service: FakeInferenceService) -> None:
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="EMPTY", max_retries=0)

    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=BODY["messages"])

    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    assert fake_service.requests == []


def test_unknown_route_is_404_in_openai_shape(gateway_url: str) -> None:
    response = httpx.post(f"{gateway_url}/v1/embeddings", json={"input": "x"})

    assert response.status_code == 404
    assert error_of(response)["code"] == "unknown_url"


@pytest.fixture
def small_body_gateway(make_gateway: GatewayFactory) -> Iterator[str]:
    with make_gateway(max_body_bytes=2048) as url:
        yield url


def test_body_over_the_limit_is_413(
    small_body_gateway: str, fake_service: FakeInferenceService
) -> None:
    body = {**BODY, "messages": [{"role": "user", "content": "x" * 4096}]}

    response = post_chat(small_body_gateway, body)

    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"
    assert fake_service.requests == []


def test_chunked_body_over_the_limit_is_413_without_content_length(
    small_body_gateway: str, fake_service: FakeInferenceService
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}]}'

    response = httpx.post(
        f"{small_body_gateway}/v1/chat/completions",
        content=chunks(),
        headers={"content-type": "application/json"},
    )

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert fake_service.requests == []


def test_body_under_the_limit_is_served(
    small_body_gateway: str, fake_service: FakeInferenceService
) -> None:
    assert post_chat(small_body_gateway, BODY).status_code == 200


@pytest.mark.parametrize(
    ("trailers", "retry_after"),
    [
        ((("retry-after-ms", "2500"),), "3"),
        ((("retry-after", "7"),), "7"),
        ((), "1"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_resource_exhausted_is_429_with_retry_after(
    gateway_url: str,
    fake_service: FakeInferenceService,
    trailers: tuple[tuple[str, str], ...],
    retry_after: str,
    stream: bool,
) -> None:
    fake_service.script = fail(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "KV cache budget exhausted", trailing_metadata=trailers
    )

    response = post_chat(gateway_url, {**BODY, "stream": stream})

    assert response.status_code == 429
    assert response.headers["retry-after"] == retry_after
    assert error_of(response)["type"] == "rate_limit_error"


def test_unreachable_upstream_is_503_with_retry_after(make_gateway: GatewayFactory) -> None:
    with make_gateway(upstream_target=CLOSED_PORT_TARGET) as url:
        response = post_chat(url, BODY)
        health = httpx.get(f"{url}/health")

    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert error_of(response)["code"] == "unavailable"
    assert health.status_code == 503
    assert health.json()["status"] == "UNREACHABLE"


def test_upstream_deadline_exceeded_is_504(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = fail(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")

    response = post_chat(gateway_url, BODY)

    assert response.status_code == 504
    assert error_of(response)["code"] == "deadline_exceeded"


def test_error_after_streaming_started_arrives_as_an_error_event(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = fail(grpc.StatusCode.INTERNAL, "engine failed", after_pieces=("partial",))
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="EMPTY", max_retries=0)
    received: list[str] = []

    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in client.chat.completions.create(
            model=MODEL, messages=BODY["messages"], stream=True
        ):
            received.append(chunk.choices[0].delta.content or "")

    assert "".join(received) == "partial"


def test_generation_cancelled_by_the_service_is_not_reported_as_finished(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = reply(["par"], finish_reason=pb.FINISH_REASON_CANCELLED)

    whole = post_chat(gateway_url, BODY)
    streamed = post_chat(gateway_url, {**BODY, "stream": True})

    assert whole.status_code == 503
    assert error_of(whole)["code"] == "cancelled"
    events = [event for event in streamed.text.split("\n\n") if event]
    assert '"code": "cancelled"' in events[-1]
    assert "data: [DONE]" not in events


def test_health_follows_the_upstream_serving_status(
    gateway_url: str, fake_upstream: FakeUpstream, fake_service: FakeInferenceService
) -> None:
    serving = httpx.get(f"{gateway_url}/health")
    fake_upstream.set_serving(False)
    not_serving = httpx.get(f"{gateway_url}/health")

    assert (serving.status_code, serving.json()["status"]) == (200, "SERVING")
    assert (not_serving.status_code, not_serving.json()["status"]) == (503, "NOT_SERVING")


def test_request_id_that_grpc_metadata_cannot_carry_is_400(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    response = post_chat(gateway_url, BODY, headers={"x-request-id": "has spaces"})

    assert response.status_code == 400
    assert error_of(response)["param"] == "x-request-id"
    assert fake_service.requests == []


LONG = "x" * 5_000


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"model": LONG}, "model"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/{LONG};base64,AAAA"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": LONG}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].input_audio.format",
        ),
    ],
)
def test_long_client_strings_are_quoted_briefly(
    gateway_url: str, fake_service: FakeInferenceService, changes: dict[str, Any], param: str
) -> None:
    response = post_chat(gateway_url, {**BODY, **changes})

    assert response.status_code in (400, 404)
    error = error_of(response)
    assert error["param"] == param
    assert "characters)" in error["message"]
    assert len(error["message"]) < 400
    assert fake_service.requests == []


def test_long_upstream_error_message_is_clipped(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = fail(grpc.StatusCode.INVALID_ARGUMENT, "bad: " + LONG)

    response = post_chat(gateway_url, BODY)

    assert response.status_code == 400
    message = error_of(response)["message"]
    assert message.startswith("bad: xxx")
    assert len(message.encode()) <= 1024


def test_long_unknown_route_is_quoted_briefly(gateway_url: str) -> None:
    response = httpx.post(f"{gateway_url}/v1/{LONG}", json={})

    assert response.status_code == 404
    assert len(error_of(response)["message"]) < 400
