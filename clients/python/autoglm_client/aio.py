"""Asyncio client of the public inference API (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from autoglm_client.channel import (
    DEFAULT_TARGET,
    MAX_MESSAGE_BYTES,
    CallDefaults,
    open_aio_channel,
)
from autoglm_client.content import BinarySource, Conversation, prompt_conversation
from autoglm_client.request_builders import Sampling, count_tokens_request, generate_request
from autoglm_client.results import (
    Completion,
    CompletionAccumulator,
    Final,
    ProtocolError,
    StreamEvent,
    events_from_response,
)
from autoglm_client.translate import rpc_errors_translated


class AsyncInferenceClient:
    """Asyncio client of `autoglm.inference.v1.InferenceService`; same calls as the sync one.

    Create it inside a running event loop; use `async with` or `await close()`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        metadata: Iterable[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._channel = open_aio_channel(target, credentials, max_message_bytes)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._defaults = CallDefaults.of(timeout, metadata)

    async def stream(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        *,
        session_id: str | None = None,
        enable_thinking: bool = False,
        return_reasoning: bool = False,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
        n: int = 1,
    ) -> AsyncIterator[StreamEvent]:
        """Yield `TextDelta` / `ReasoningDelta` events as they arrive, then one `Final`.
        With `n` > 1 each event names its choice (`index`) and each choice ends with a
        `ChoiceEnd`.

        Leaving the loop early (or cancelling the task) cancels the call.
        """
        request = generate_request(
            conversation,
            sampling,
            session_id=session_id,
            enable_thinking=enable_thinking,
            return_reasoning=return_reasoning,
            priority=priority,
            n=n,
        )
        call = self._stub.Generate(
            request, **self._defaults.call_kwargs(timeout, request_id, session_id)
        )
        finished = False
        try:
            with rpc_errors_translated():
                async for response in call:
                    for event in events_from_response(response):
                        finished = finished or isinstance(event, Final)
                        yield event
        finally:
            call.cancel()
        if not finished:
            raise ProtocolError("Generate stream ended without a final message")

    async def generate(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        *,
        session_id: str | None = None,
        enable_thinking: bool = False,
        return_reasoning: bool = False,
        priority: int = 0,
        timeout: float | None = None,
        request_id: str | None = None,
        n: int = 1,
    ) -> Completion:
        """Run a Generate call to its end and return the whole reply (`choices`: all n)."""
        accumulator = CompletionAccumulator()
        async for event in self.stream(
            conversation,
            sampling,
            session_id=session_id,
            enable_thinking=enable_thinking,
            return_reasoning=return_reasoning,
            priority=priority,
            timeout=timeout,
            request_id=request_id,
            n=n,
        ):
            accumulator.add(event)
        return accumulator.completion()

    async def chat(
        self,
        prompt: str,
        *,
        images: Iterable[BinarySource] = (),
        audio_clips: Iterable[BinarySource] = (),
        system_prompt: str | None = None,
        sampling: Sampling | None = None,
        session_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Send one user turn (text plus optional images and WAV clips); return the answer."""
        conversation = prompt_conversation(
            prompt, images=images, audio_clips=audio_clips, system_prompt=system_prompt
        )
        completion = await self.generate(
            conversation, sampling, session_id=session_id, timeout=timeout
        )
        return completion.text

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """Describe the served model and its modules."""
        with rpc_errors_translated():
            return await self._stub.GetModelInfo(
                pb.GetModelInfoRequest(), **self._defaults.call_kwargs(timeout, None)
            )

    async def count_tokens(
        self,
        conversation: Conversation,
        *,
        enable_thinking: bool = False,
        timeout: float | None = None,
    ) -> pb.CountTokensResponse:
        """Count the prompt tokens of a conversation without generating."""
        request = count_tokens_request(conversation, enable_thinking=enable_thinking)
        with rpc_errors_translated():
            return await self._stub.CountTokens(
                request, **self._defaults.call_kwargs(timeout, None)
            )

    async def end_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """Drop a session's cached state; return the bytes the server released."""
        request = pb.EndSessionRequest(session_id=session_id)
        with rpc_errors_translated():
            response = await self._stub.EndSession(
                request, **self._defaults.call_kwargs(timeout, None, session_id)
            )
        return response.freed_bytes

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferenceClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
