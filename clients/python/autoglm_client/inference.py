"""Synchronous client of the public inference API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Unpack

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client import calls
from autoglm_client.channel import ClosesChannel, open_channel
from autoglm_client.content import Conversation
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
        yield from self._events(self._calls.generate(conversation, sampling, **options))

    def generate(
        self,
        conversation: Conversation,
        sampling: Sampling | None = None,
        **options: Unpack[calls.GenerateOptions],
    ) -> Completion:
        """Run a Generate call to its end and return the whole reply (`choices`: all n)."""
        return self._completion(self._calls.generate(conversation, sampling, **options))

    def chat(self, prompt: str, **options: Unpack[calls.ChatOptions]) -> str:
        """Send one user turn (text plus optional images and WAV clips); return the answer."""
        return self._completion(self._calls.chat(prompt, **options)).text

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

    def _events(self, generate: calls.Call[pb.GenerateRequest]) -> Iterator[StreamEvent]:
        call = generate.send(self._stub.Generate)
        replies = calls.GenerateReplies()
        try:
            with rpc_errors_translated():
                for response in call:
                    yield from replies.events(response)
        finally:
            call.cancel()
        replies.check_ended()

    def _completion(self, generate: calls.Call[pb.GenerateRequest]) -> Completion:
        accumulator = CompletionAccumulator()
        for event in self._events(generate):
            accumulator.add(event)
        return accumulator.completion()
