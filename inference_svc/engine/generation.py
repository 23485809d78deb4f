"""One request's generation on the model thread, with transformers' generate()."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from inference_svc.engine.logprobs import RawLogprob, describe
from inference_svc.engine.text_stream import TextStream
from inference_svc.types import Delta, FinishReason, SamplingParams, TokenLogprob


class StopWhen(StoppingCriteria):
    """Stops generation when the predicate turns true (cancel, deadline, stop sequence)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self.predicate = predicate

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs):
        return torch.full((input_ids.shape[0],), self.predicate(), dtype=torch.bool)


class DeltaStreamer(BaseStreamer):
    """Receives token ids from generate() and emits text deltas through `emit`."""

    def __init__(self, text: TextStream, emit: Callable[[Delta], None], *, reasoning: bool,
                 index: int = 0) -> None:
        self.text = text
        self.index = index  # the choice whose tokens it streams
        self.emit = emit
        self.reasoning = reasoning
        self.token_ids: list[int] = []
        self.reasoning_tokens = 0
        self._prompt_seen = False
        self._logprobs: list[TokenLogprob] = []  # sent with the next delta

    def add_logprobs(self, recorded: list[RawLogprob]) -> None:
        """Log probabilities of the tokens about to be put; they go out with the next
        delta, or with a delta of their own when those tokens make no text yet."""
        tokenizer = self.text.tokenizer
        self._logprobs.extend(describe(raw, tokenizer) for raw in recorded)

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
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


def generation_config(
    sampling: SamplingParams, *, max_new_tokens: int, eos_ids: list[int], pad_id: int
) -> GenerationConfig:
    greedy = sampling.temperature <= 0
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min(sampling.min_new_tokens, max_new_tokens),
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy or not sampling.top_k else sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )


class Cancellation:
    """Why a running request must stop, set from any thread."""

    def __init__(self, deadline: float | None) -> None:
        self._event = threading.Event()
        self.deadline = deadline

    def cancel(self) -> None:
        self._event.set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    @property
    def requested(self) -> bool:
        return self._event.is_set() or self.expired


def finish_reason(
    streamer: DeltaStreamer, cancellation: Cancellation, *, eos_ids: list[int], max_new_tokens: int
) -> FinishReason:
    if streamer.text.stopped:
        return FinishReason.STOP_SEQUENCE
    if cancellation.requested:
        return FinishReason.CANCELLED
    if streamer.token_ids and streamer.token_ids[-1] in eos_ids:
        return FinishReason.STOP
    return FinishReason.LENGTH if len(streamer.token_ids) >= max_new_tokens else FinishReason.STOP
