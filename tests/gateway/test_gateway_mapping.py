"""Request and error mapping, without servers."""

from __future__ import annotations

import grpc
import pytest

from gateway.errors import (
    BadRequest,
    PayloadTooLarge,
    RateLimited,
    UpstreamUnavailable,
    error_from_rpc,
)
from gateway.openai_schema import ChatCompletionRequest
from gateway.request_mapping import to_generate_request


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def rpc_error(
    code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, str], ...] = ()
) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


def test_unsent_sampling_fields_stay_unset_so_server_defaults_apply() -> None:
    sampling = to_generate_request(chat()).sampling

    assert sampling.ListFields() == []


def test_zero_values_are_sent_when_the_client_sent_them() -> None:
    sampling = to_generate_request(chat(temperature=0, seed=0, presence_penalty=0)).sampling

    assert sampling.HasField("temperature") and sampling.temperature == 0
    assert sampling.HasField("seed") and sampling.seed == 0
    assert sampling.HasField("presence_penalty")


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    request = to_generate_request(chat(max_tokens=100, max_completion_tokens=9))

    assert request.sampling.max_new_tokens == 9


def test_stop_list_and_extensions_are_carried() -> None:
    request = to_generate_request(
        chat(stop=["a", "b"], min_tokens=2, priority=3, top_p=0.9, frequency_penalty=0.5)
    )

    assert list(request.sampling.stop_sequences) == ["a", "b"]
    assert request.sampling.min_new_tokens == 2
    assert request.sampling.top_p == pytest.approx(0.9)
    assert request.sampling.frequency_penalty == pytest.approx(0.5)
    assert request.priority == 3


@pytest.mark.parametrize(
    ("url", "mime_type"),
    [
        ("data:image/jpeg;base64,AAEC", "image/jpeg"),
        ("data:image/jpg;base64,AAEC", "image/jpeg"),
        ("data:image/webp;base64,AAEC", "image/webp"),
    ],
)
def test_image_data_uris_keep_their_type(url: str, mime_type: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    request = to_generate_request(chat(messages=[{"role": "user", "content": content}]))

    image = request.messages[0].parts[0].image
    assert (image.data, image.mime_type) == (b"\x00\x01\x02", mime_type)


@pytest.mark.parametrize(
    "url",
    ["data:image/gif;base64,AAEC", "data:image/png,rawbytes", "file:///etc/passwd", "AAEC"],
)
def test_unusable_image_urls_are_rejected(url: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]

    with pytest.raises(BadRequest) as raised:
        to_generate_request(chat(messages=[{"role": "user", "content": content}]))

    assert raised.value.param == "messages[0].content[0].image_url.url"


def test_empty_stop_sequence_is_rejected() -> None:
    with pytest.raises(BadRequest) as raised:
        to_generate_request(chat(stop=["ok", ""]))

    assert raised.value.param == "stop[1]"


def test_message_without_content_is_rejected() -> None:
    with pytest.raises(BadRequest) as raised:
        to_generate_request(chat(messages=[{"role": "assistant", "content": None}]))

    assert raised.value.param == "messages[0].content"


@pytest.mark.parametrize(
    ("code", "expected_type", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, BadRequest, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimited, 429),
        (grpc.StatusCode.UNAVAILABLE, UpstreamUnavailable, 503),
        (grpc.StatusCode.NOT_FOUND, None, 404),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, 504),
        (grpc.StatusCode.INTERNAL, None, 500),
    ],
)
def test_grpc_codes_map_to_http_statuses(
    code: grpc.StatusCode, expected_type: type | None, status: int
) -> None:
    error = error_from_rpc(rpc_error(code, "boom"), default_retry_after_s=1)

    assert error.status_code == status
    if expected_type is not None:
        assert isinstance(error, expected_type)


def test_grpc_message_size_limit_is_413_not_429() -> None:
    error = error_from_rpc(
        rpc_error(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Received message larger than max (40000000 vs. 4194304)",
        ),
        default_retry_after_s=1,
    )

    assert isinstance(error, PayloadTooLarge)


def test_retry_hint_is_rounded_up_to_whole_seconds() -> None:
    error = error_from_rpc(
        rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", (("retry-after-ms", "200"),)),
        default_retry_after_s=5,
    )

    assert error.headers() == {"Retry-After": "1"}
