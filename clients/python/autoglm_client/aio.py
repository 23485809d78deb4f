"""Asyncio client of the public inference API (grpc.aio)."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Unpack

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client import calls
from autoglm_client.channel import open_aio_channel
from autoglm_client.content import Conversation
from autoglm_client.live import live_requests_async
from autoglm_client.request_builders import Sampling
from autoglm_client.results import Completion, CompletionAccumulator, StreamEvent
from autoglm_client.translate import rpc_errors_translated


class AsyncInferenceClient(calls.InferenceClientBase):
    """Asyncio client of `autoglm.inference.v1.InferenceService`; same calls as the sync one.

    Create it inside a running event loop; use `async with` or `await close()`.
    """

    _open_channel = staticmethod(open_aio_channel)

    async def stream(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        **options: Unpack[calls.GenerateOptions],
    ) -> AsyncIterator[StreamEvent]:
        """The events of `InferenceClient.stream`, as they arrive. Leaving the loop early (or
        cancelling the task) cancels the call."""
        call = self._calls.generate(conversation, sampling, **options)
        async for event in self._events(lambda: call.send(self._stub.Generate)):
            yield event

    async def generate(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        **options: Unpack[calls.GenerateOptions],
    ) -> Completion:
        """Run a Generate call to its end and return the whole reply (`choices`: all n)."""
        call = self._calls.generate(conversation, sampling, **options)
        return await self._completion(lambda: call.send(self._stub.Generate))

    async def stream_live(
        self,
        conversation: Conversation,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        sampling: Sampling | None = None,
        **options: Unpack[calls.LiveOptions],
    ) -> AsyncIterator[StreamEvent]:
        """`InferenceClient.stream_live` for asyncio; `chunks` may be an async iterable
        (`live.wav_chunks_async` paces a WAV file without blocking the loop)."""
        call = self._calls.generate_live(conversation, sampling, **options)
        async for event in self._events(lambda: self._stub.GenerateLive(
                live_requests_async(call.request, chunks), **call.options)):
            yield event

    async def generate_live(
        self,
        conversation: Conversation,
        chunks: Iterable[bytes] | AsyncIterable[bytes],
        sampling: Sampling | None = None,
        **options: Unpack[calls.LiveOptions],
    ) -> Completion:
        """Run a GenerateLive call (see `stream_live`) and return the whole reply."""
        accumulator = CompletionAccumulator()
        async for event in self.stream_live(conversation, chunks, sampling, **options):
            accumulator.add(event)
        return accumulator.completion()

    async def chat(self, prompt: str, **options: Unpack[calls.ChatOptions]) -> str:
        """Send one user turn (text plus optional images and WAV clips); return the answer."""
        call = self._calls.chat(prompt, **options)
        return (await self._completion(lambda: call.send(self._stub.Generate))).text

    async def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """Describe the served model and its modules."""
        with rpc_errors_translated():
            return await self._calls.model_info(timeout).send(self._stub.GetModelInfo)

    async def count_tokens(
        self, conversation: Conversation, **options: Unpack[calls.CountTokensOptions]
    ) -> pb.CountTokensResponse:
        """Count the prompt tokens of a conversation without generating."""
        call = self._calls.count_tokens(conversation, **options)
        with rpc_errors_translated():
            return await call.send(self._stub.CountTokens)

    async def end_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """Drop a session's cached state; return the bytes the server released."""
        call = self._calls.end_session(session_id, timeout)
        with rpc_errors_translated():
            response = await call.send(self._stub.EndSession)
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

    async def _events(self, start: Callable[[], Any]) -> AsyncIterator[StreamEvent]:
        """The events of a Generate or GenerateLive call, which `start` begins."""
        call = start()
        replies = calls.GenerateReplies()
        try:
            with rpc_errors_translated():
                async for response in call:
                    for event in replies.events(response):
                        yield event
        finally:
            call.cancel()
        replies.check_ended()

    async def _completion(self, start: Callable[[], Any]) -> Completion:
        accumulator = CompletionAccumulator()
        async for event in self._events(start):
            accumulator.add(event)
        return accumulator.completion()
