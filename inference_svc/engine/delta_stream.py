"""A sequence's generated tokens as the deltas its request's stream carries."""

from __future__ import annotations

from collections.abc import Callable

from inference_svc.engine.logprobs import RawLogprob, describe
from inference_svc.engine.text_stream import TextStream
from inference_svc.types import Delta, TokenLogprob


class DeltaStreamer:
    """Takes a sequence's tokens one at a time and emits text deltas through `emit`."""

    def __init__(self, text: TextStream, emit: Callable[[Delta], None], *, reasoning: bool,
                 index: int = 0) -> None:
        self.text = text
        self.index = index  # the choice whose tokens it streams
        self.emit = emit
        self.reasoning = reasoning
        self.token_ids: list[int] = []
        self.reasoning_tokens = 0
        self._logprobs: list[TokenLogprob] = []  # sent with the next delta

    def add_logprobs(self, recorded: list[RawLogprob]) -> None:
        """Log probabilities of the tokens about to be put; they go out with the next
        delta, or with a delta of their own when those tokens make no text yet."""
        tokenizer = self.text.tokenizer
        self._logprobs.extend(describe(raw, tokenizer) for raw in recorded)

    def put(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.text.in_reasoning:
            self.reasoning_tokens += 1
        self._send(self.text.push(token_id))

    def end(self) -> None:
        self._send(self.text.finish())

    def _send(self, split) -> None:
        reasoning = split.reasoning if self.reasoning else ""
        if split.answer or reasoning or self._logprobs:
            self.emit(Delta(text=split.answer, reasoning=reasoning,
                            logprobs=tuple(self._logprobs), index=self.index))
            self._logprobs = []
