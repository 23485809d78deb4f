"""The output stage: a request's text pipeline, and the final event that ends it.

Tokens become text deltas (stop sequences held back, reasoning split off) through
`TextStream`, which the streamer feeds; the final event carries why it ended and the
usage. The stop rules (`stop_reason`) are written here once: the scheduler asks them
whether a sequence ends after each token, and the final says which one ended it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from inference_svc.engine.delta_stream import DeltaStreamer
from inference_svc.engine.sequences import Job
from inference_svc.engine.text_stream import THINK_OPEN, TextStream
from inference_svc.types import (
    ChoiceEnd,
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    ImageSize,
    Usage,
)


def open_stream(tokenizer, job: Job, index: int, emit: Callable[[Delta], None]
                ) -> tuple[TextStream, DeltaStreamer]:
    """The text pipeline of the request's choice `index` and the streamer that feeds its
    client through `emit`."""
    request = job.request
    # Structured output must reach the client exactly as the grammar made it.
    answer_tags = job.plan.answer_tags and request.sampling.response_format is None
    text = TextStream(tokenizer, request.sampling.stop_sequences,
                      start_in_reasoning=starts_in_reasoning(tokenizer, job),
                      answer_tags=answer_tags)
    # `emit` must not close over the streamer: a streamer <-> closure cycle kept each
    # finished Job (its decoded images and audio) alive until a full garbage collection,
    # and RSS grew ~25 MB/min under mixed traffic
    streamer = DeltaStreamer(text, emit, reasoning=request.return_reasoning, index=index)
    return text, streamer


def starts_in_reasoning(tokenizer, job: Job) -> bool:
    """The chat template opened a <think> block the model continues."""
    if not job.request.enable_thinking:
        return False
    tail = tokenizer.decode(job.plan.input_ids[-8:])
    return tail.rstrip().endswith(THINK_OPEN)


def stop_reason(job: Job, streamer: DeltaStreamer, eos_ids: frozenset[int]
                ) -> FinishReason | None:
    """Why the sequence ends after the tokens it has, or None while it goes on."""
    if streamer.text.stopped:
        return FinishReason.STOP_SEQUENCE
    if job.handle.cancellation.requested:
        return FinishReason.CANCELLED
    if streamer.token_ids and streamer.token_ids[-1] in eos_ids:
        return FinishReason.STOP
    if len(streamer.token_ids) >= job.max_new_tokens:
        return FinishReason.LENGTH
    return None


def end_reason(job: Job, streamer: DeltaStreamer, eos_ids: frozenset[int]) -> FinishReason:
    """Why an ended sequence ended (one the loop ended for no rule of its own, such as a
    resumed choice whose request was done, stopped)."""
    return stop_reason(job, streamer, eos_ids) or FinishReason.STOP


def final_event(job: Job, streamer: DeltaStreamer, text: TextStream, reason: FinishReason,
                cached_tokens: int) -> Finished:
    used = usage(job, len(streamer.token_ids))
    used.reasoning_tokens = streamer.reasoning_tokens
    used.cached_prompt_tokens = cached_tokens
    images = [ImageSize(i.image.width, i.image.height, *i.original_size,
                        i.reduced_under_pressure) for i in job.media.images]
    return Finished(reason, used, text.matched_stop, images=images)


def choice_end(index: int, streamer: DeltaStreamer, text: TextStream,
               reason: FinishReason) -> ChoiceEnd:
    return ChoiceEnd(index, reason, len(streamer.token_ids), streamer.reasoning_tokens,
                     text.matched_stop)


def choices_final(job: Job, ends: list[ChoiceEnd], cached_tokens: int) -> Finished:
    """The end of a request with several choices: the prompt counted once, every choice's
    tokens; CANCELLED when any choice was, otherwise choice 0's reason."""
    ends = sorted(ends, key=lambda e: e.index)
    used = usage(job, sum(e.completion_tokens for e in ends))
    used.reasoning_tokens = sum(e.reasoning_tokens for e in ends)
    used.cached_prompt_tokens = cached_tokens
    cancelled = any(e.reason is FinishReason.CANCELLED for e in ends)
    reason = FinishReason.CANCELLED if cancelled else ends[0].reason
    images = [ImageSize(i.image.width, i.image.height, *i.original_size,
                        i.reduced_under_pressure) for i in job.media.images]
    return Finished(reason, used, ends[0].matched_stop_sequence, images=images,
                    choices=tuple(ends))


def choice_seed(request: GenerationRequest, index: int) -> int:
    """Choice i samples with seed + i (so it says what a single request with that seed
    says); unseeded choices each get a fresh random seed."""
    seed = request.sampling.seed
    return (seed + index) % 2**64 if seed is not None else seed_of(request)


def usage(job: Job, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=len(job.plan.input_ids), completion_tokens=completion_tokens,
        image_tokens=job.plan.image_tokens, audio_tokens=job.plan.audio_tokens,
    )


def seed_of(request: GenerationRequest) -> int:
    """The request's seed, or a fresh random one."""
    seed = request.sampling.seed
    return seed if seed is not None else int.from_bytes(os.urandom(7), "little")
