"""One request at a time through transformers' generate(), for models that are not paged
decoders (native GLM-4.1V until it joins the batch), with dense per-session caches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList

from inference_svc.engine import kv_cache
from inference_svc.engine.batch import NonFiniteScores
from inference_svc.engine.generation import (
    DeltaStreamer,
    FrequencyPresencePenalty,
    StopWhen,
    generation_config,
)
from inference_svc.engine.jobs import Job
from inference_svc.engine.output import open_stream, seed_of
from inference_svc.engine.sessions import Reuse, SessionStore
from inference_svc.engine.text_stream import TextStream


@dataclass
class DenseRun:
    """What one generate() call left: its stream, the reused prefix, and how to keep its KV."""

    text: TextStream
    streamer: DeltaStreamer
    reuse: Reuse | None
    keep: Callable[[], None]


def generate_alone(model, job: Job, sessions: SessionStore, *, prefix_caching: bool,
                   kv_budget_bytes: int, on_progress: Callable[[int], None]) -> DenseRun:
    """Generate `job` to its end; `on_progress(tokens)` runs at every token."""
    request, plan = job.request, job.plan
    reuse = None
    if request.session_id or prefix_caching:
        reuse = sessions.take(request.session_id, plan.content)
        if reuse is not None and kv_cache.device_of(reuse.cache) != model.device:
            kv_cache.move(reuse.cache, model.device)  # it was offloaded to the host
    inputs = model.generation_inputs(plan, job.media, cached=reuse.tokens if reuse else 0)
    text, streamer = open_stream(model.tokenizer, job)
    cancellation = job.handle.cancellation

    def should_stop() -> bool:
        on_progress(len(streamer.token_ids))
        return cancellation.requested or text.stopped

    torch.manual_seed(seed_of(request))
    penalties = []
    if request.sampling.frequency_penalty or request.sampling.presence_penalty:
        penalties.append(FrequencyPresencePenalty(
            request.sampling.frequency_penalty, request.sampling.presence_penalty,
            len(plan.input_ids)))
    with model.decoder_unit.use() as decoder, torch.inference_mode():
        cache = reuse.cache if reuse else DynamicCache(config=decoder.config)
        decoder.generate(
            **inputs,
            generation_config=generation_config(
                request.sampling, max_new_tokens=job.max_new_tokens,
                eos_ids=model.eos_token_ids, pad_id=model.placeholder_id),
            logits_processor=LogitsProcessorList(penalties),
            stopping_criteria=[StopWhen(should_stop)],
            streamer=streamer,
            cache=cache,
        )

    def keep() -> None:
        if not kv_cache.all_finite(cache):  # never hand a poisoned cache to anyone
            raise NonFiniteScores()
        sessions.put(request.session_id, request.request_id,
                     plan.content + streamer.token_ids, cache)
        excess = sessions.total_bytes() - kv_budget_bytes  # idle caches past the budget go
        if excess > 0:
            sessions.evict_lru(excess)

    return DenseRun(text, streamer, reuse, keep)
