"""Synchronous client of the public inference API."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Unpack

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client import calls
from autoglm_client.channel import ClosesChannel, open_channel
from autoglm_client.content import Conversation
from autoglm_client.live import live_requests
from autoglm_client.request_builders import Sampling
from autoglm_client.results import Completion, CompletionAccumulator, StreamEvent
from autoglm_client.translate import rpc_errors_translated


class InferenceClient(calls.InferenceClientBase, ClosesChannel):
    """Blocking client of `autoglm.inference.v1.InferenceService`.

    Constructor: see `calls.InferenceClientBase` (target, default timeout and metadata,
    credentials); `with` closes the channel.
    """

    _open_channel = staticmethod(open_channel)

    def stream(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        **options: Unpack[calls.GenerateOptions],
    ) -> Iterator[StreamEvent]:
        """Yield `TextDelta` / `ReasoningDelta` events as they arrive, then one `Final`.
        With `n` > 1 each event names its choice (`index`) and each choice ends with a
        `ChoiceEnd`. `options`: see `calls.GenerateOptions`.

        Leaving the loop early cancels the call, which frees its memory on the server.
        """
        call = self._calls.generate(conversation, sampling, **options)
        yield from self._events(lambda: call.send(self._stub.Generate))

    def generate(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        **options: Unpack[calls.GenerateOptions],
    ) -> Completion:
        """Run a Generate call to its end and return the whole reply (`choices`: all n)."""
        call = self._calls.generate(conversation, sampling, **options)
        return self._completion(lambda: call.send(self._stub.Generate))

    def stream_live(
        self,
        conversation: Conversation,
        chunks: Iterable[bytes],
        sampling: Sampling | None = None,
        **options: Unpack[calls.LiveOptions],
    ) -> Iterator[StreamEvent]:
        """GenerateLive: send the conversation, then `chunks` of PCM audio (16 kHz mono,
        `encoding` s16le or f32le, 10-500 ms each; `live.wav_chunks` reads a WAV file, in
        real time if asked) as they come, then the end; yield the reply's events as
        `stream` does. The audio ends the last user message (or becomes a new one)."""
        call = self._calls.generate_live(conversation, sampling, **options)
        yield from self._events(lambda: self._stub.GenerateLive(
            live_requests(call.request, chunks), **call.options))

    def generate_live(
        self,
        conversation: Conversation,
        chunks: Iterable[bytes],
        sampling: Sampling | None = None,
        **options: Unpack[calls.LiveOptions],
    ) -> Completion:
        """Run a GenerateLive call (see `stream_live`) and return the whole reply."""
        accumulator = CompletionAccumulator()
        for event in self.stream_live(conversation, chunks, sampling, **options):
            accumulator.add(event)
        return accumulator.completion()

    def chat(self, prompt: str, **options: Unpack[calls.ChatOptions]) -> str:
        """Send one user turn (text plus optional images and WAV clips); return the answer."""
        call = self._calls.chat(prompt, **options)
        return self._completion(lambda: call.send(self._stub.Generate)).text

    def model_info(self, *, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """Describe the served model and its modules."""
        with rpc_errors_translated():
            return self._calls.model_info(timeout).send(self._stub.GetModelInfo)

    def count_tokens(
        self, conversation: Conversation, **options: Unpack[calls.CountTokensOptions]
    ) -> pb.CountTokensResponse:
        """Count the prompt tokens of a conversation without generating."""
        call = self._calls.count_tokens(conversation, **options)
        with rpc_errors_translated():
            return call.send(self._stub.CountTokens)

    def end_session(self, session_id: str, *, timeout: float | None = None) -> int:
        """Drop a session's cached state; return the bytes the server released."""
        with rpc_errors_translated():
            response = self._calls.end_session(session_id, timeout).send(self._stub.EndSession)
        return response.freed_bytes

    def _events(self, start: Callable[[], Any]) -> Iterator[StreamEvent]:
        """The events of a Generate or GenerateLive call, which `start` begins."""
        call = start()
        replies = calls.GenerateReplies()
        try:
            with rpc_errors_translated():
                for response in call:
                    yield from replies.events(response)
        finally:
            call.cancel()
        replies.check_ended()

    def _completion(self, start: Callable[[], Any]) -> Completion:
        accumulator = CompletionAccumulator()
        for event in self._events(start):
            accumulator.add(event)
        return accumulator.completion()
