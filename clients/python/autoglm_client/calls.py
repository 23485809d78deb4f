"""Every inference call prepared once, for the sync and the asyncio client alike: the
request message with its deadline and metadata. The clients only send what is built here
and read the replies."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Literal, TypedDict, TypeVar, Unpack

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from autoglm_client.channel import DEFAULT_TARGET, MAX_MESSAGE_BYTES, CallDefaults
from autoglm_client.content import BinarySource, Conversation, prompt_conversation
from autoglm_client.request_builders import (
    Sampling,
    count_tokens_request,
    generate_request,
    live_start,
)
from autoglm_client.results import Final, ProtocolError, StreamEvent, events_from_response

RequestT = TypeVar("RequestT")
ReplyT = TypeVar("ReplyT")


class GenerateFields(TypedDict, total=False):
    """Fields of a GenerateRequest besides the conversation and sampling."""

    session_id: str | None  # keep the KV between turns; also sent as x-session-id
    enable_thinking: bool
    return_reasoning: bool
    priority: int
    n: int  # choices to generate


class GenerateOptions(GenerateFields, total=False):
    """Keyword options of `stream` and `generate`."""

    timeout: float | None  # seconds; None: the client's default
    request_id: str | None  # sent as x-request-id, echoed in logs and replies


class LiveOptions(GenerateOptions, total=False):
    """Keyword options of `stream_live` and `generate_live`: Generate's, and the format of
    the chunks (16 kHz mono; the WAV helpers of `autoglm_client.live` yield s16le)."""

    sample_rate_hz: int
    encoding: Literal["s16le", "f32le"]


class CountTokensOptions(TypedDict, total=False):
    """Keyword options of `count_tokens`."""

    enable_thinking: bool
    timeout: float | None


class ChatOptions(TypedDict, total=False):
    """Keyword options of `chat`: one user turn and how to answer it."""

    images: Iterable[BinarySource]
    audio_clips: Iterable[BinarySource]  # WAV
    system_prompt: str | None
    sampling: Sampling | None
    session_id: str | None
    timeout: float | None


@dataclass(frozen=True, slots=True)
class Call(Generic[RequestT]):
    """One RPC ready to send: its request and the stub call's timeout and metadata."""

    request: RequestT
    options: dict[str, object]

    def send(self, method: Callable[..., ReplyT]) -> ReplyT:
        """Invoke a stub method (sync or aio) with this call."""
        return method(self.request, **self.options)


class InferenceCalls:
    """Builds the calls of `autoglm.inference.v1.InferenceService` under a client's defaults."""

    def __init__(self, defaults: CallDefaults) -> None:
        self._defaults = defaults

    def generate(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **fields: Unpack[GenerateFields],
    ) -> Call[pb.GenerateRequest]:
        request = generate_request(conversation, sampling, **fields)
        options = self._defaults.call_kwargs(timeout, request_id, fields.get("session_id"))
        return Call(request, options)

    def generate_live(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        *,
        sample_rate_hz: int = 16_000,
        encoding: str = "s16le",
        timeout: float | None = None,
        request_id: str | None = None,
        **fields: Unpack[GenerateFields],
    ) -> Call[pb.GenerateLiveStart]:
        """GenerateLive's `start` (the chunks and `end` follow it: `live.live_requests`)."""
        start = live_start(conversation, sampling, sample_rate_hz=sample_rate_hz,
                           encoding=encoding, **fields)
        options = self._defaults.call_kwargs(timeout, request_id, fields.get("session_id"))
        return Call(start, options)

    def chat(
        self,
        prompt: str,
        *,
        images: Iterable[BinarySource] = (),
        audio_clips: Iterable[BinarySource] = (),
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> Call[pb.GenerateRequest]:
        conversation = prompt_conversation(
            prompt, images=images, audio_clips=audio_clips, system_prompt=system_prompt
        )
        return self.generate(conversation, sampling, session_id=session_id, timeout=timeout)

    def model_info(self, timeout: float | None) -> Call[pb.GetModelInfoRequest]:
        return Call(pb.GetModelInfoRequest(), self._defaults.call_kwargs(timeout, None))

    def count_tokens(
        self, conversation: Conversation, *, enable_thinking: bool = False,
        timeout: float | None = None,
    ) -> Call[pb.CountTokensRequest]:
        request = count_tokens_request(conversation, enable_thinking=enable_thinking)
        return Call(request, self._defaults.call_kwargs(timeout, None))

    def end_session(self, session_id: str, timeout: float | None) -> Call[pb.EndSessionRequest]:
        request = pb.EndSessionRequest(session_id=session_id)
        return Call(request, self._defaults.call_kwargs(timeout, None, session_id))


class InferenceClientBase:
    """What both inference clients hold: a channel, a stub on it, and the calls' builder.

    `timeout` (seconds) and `metadata` apply to every call unless a call overrides them.
    For a TLS port pass `credentials=tls_credentials(ca_file)`.
    """

    # open_channel or open_aio_channel: the one thing the two clients set up differently
    _open_channel: ClassVar[Callable[[str, grpc.ChannelCredentials | None, int], Any]]

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._channel = self._open_channel(target, credentials, max_message_bytes)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._calls = InferenceCalls(CallDefaults.of(timeout, metadata))


class GenerateReplies:
    """Turns a Generate stream's responses into events and checks that it ended properly."""

    def __init__(self) -> None:
        self._final_seen = False

    def events(self, response: pb.GenerateResponse) -> list[StreamEvent]:
        events = events_from_response(response)
        self._final_seen = self._final_seen or any(isinstance(e, Final) for e in events)
        return events

    def check_ended(self) -> None:
        if not self._final_seen:
            raise ProtocolError("Generate stream ended without a final message")
