"""The engine: admits requests, runs them on one model thread, streams events back.

Transports call `submit()` from asyncio and iterate the handle's events; the model
thread never touches asyncio objects except through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog
import torch
from transformers import DynamicCache, LogitsProcessorList

from inference_svc.engine.generation import (
    Cancellation,
    DeltaStreamer,
    FrequencyPresencePenalty,
    StopWhen,
    finish_reason,
    generation_config,
)
from inference_svc.engine.sessions import SessionStore
from inference_svc.engine.text_stream import THINK_OPEN, TextStream
from inference_svc.engine.types import (
    Event,
    Finished,
    FinishReason,
    GenerationRequest,
    ImageSize,
    SamplingParams,
    Usage,
)
from inference_svc.errors import ContextTooLong, InvalidRequest, NotReady, ResourceExhausted
from inference_svc.model.modular import DecodedMedia, ModularModel
from inference_svc.model.prompt import PromptPlan

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_queued: int = 64
    max_pixels: int = 1_003_520  # the reference deployment's max_pixels (1280*28*28)
    queue_timeout_s: float = 30.0
    kv_budget_bytes: int = 2 * 1024**3
    session_idle_ttl_s: float = 600.0
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if self.kv_budget_bytes < 1024**2:
            raise ValueError("kv_budget_bytes must be at least 1 MiB")
        if self.max_pixels < 64 * 64:
            raise ValueError("max_pixels must be at least 4096")


@dataclass(frozen=True)
class Admission:
    mode: str = "open"  # "open" | "limited" | "paused"
    max_running: int = 0


@dataclass
class _Failed:
    error: BaseException


@dataclass
class RunningInfo:
    request_id: str
    session_id: str
    modalities: set[str]
    prompt_tokens: int
    generated_tokens: int = 0


@dataclass(order=True)
class _Job:
    sort_key: tuple[int, int]
    request: GenerationRequest = field(compare=False)
    plan: PromptPlan = field(compare=False)
    media: DecodedMedia = field(compare=False)
    max_new_tokens: int = field(compare=False)
    handle: RequestHandle = field(compare=False)
    enqueued_at: float = field(compare=False, default_factory=time.monotonic)


class RequestHandle:
    """The asyncio side of one request: its event stream and a cancel switch."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancellation = Cancellation(request.deadline)
        self._loop = loop
        self._events: asyncio.Queue[Event | _Failed] = asyncio.Queue()

    def push(self, event: Event | _Failed) -> None:
        """Thread-safe: called from the model thread."""
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        self.cancellation.cancel()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self._events.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item
            if isinstance(item, Finished):
                return


class Engine:
    def __init__(self, model: ModularModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self._queue: queue.PriorityQueue[_Job | None] = queue.PriorityQueue()
        self._sequence = itertools.count()
        self._thread = threading.Thread(target=self._run, name="model-loop", daemon=True)
        self._lock = threading.Lock()
        self._running: dict[str, RunningInfo] = {}
        self._queued = 0
        self._completed = 0
        self._stopping = False
        self._admission = Admission()
        self._admission_changed = threading.Condition()
        self.sessions = SessionStore(idle_ttl_s=config.session_idle_ttl_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._queue.put(_Job((-(2**31), -1), None, None, None, 0, None))  # type: ignore[arg-type]
        self._thread.join(timeout)

    # ---- the asyncio side -------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RequestHandle:
        if self._stopping:
            raise NotReady("the service is shutting down")
        validate(request)
        media, plan = await asyncio.to_thread(self._prepare, request)
        context = self.model.context_length
        prompt_tokens = len(plan.input_ids)
        if prompt_tokens >= context:
            raise ContextTooLong(
                f"prompt is {prompt_tokens} tokens; the context length is {context}",
                field="messages",
            )
        max_new = min(request.sampling.max_new_tokens, context - prompt_tokens)
        needed = self.kv_estimate(prompt_tokens, max_new)
        if needed > self.config.kv_budget_bytes:
            raise ResourceExhausted(
                f"request needs {needed} bytes of KV cache (prompt {prompt_tokens} + "
                f"max_new_tokens {max_new}); the KV budget is {self.config.kv_budget_bytes}",
                resource="kv_cache", retry_after_s=0.0,
            )
        with self._lock:
            if self._queued >= self.config.max_queued:
                raise ResourceExhausted(
                    f"request queue is full ({self.config.max_queued} waiting)",
                    resource="queue", retry_after_s=1.0,
                )
            self._queued += 1
        handle = RequestHandle(request, asyncio.get_running_loop())
        job = _Job((-request.priority, next(self._sequence)), request, plan, media, max_new, handle)
        self._queue.put(job)
        return handle

    def _prepare(self, request: GenerationRequest) -> tuple[DecodedMedia, PromptPlan]:
        media = self.model.decode_media(request.messages, max_pixels=self.config.max_pixels)
        plan = self.model.plan(request.messages, media, enable_thinking=request.enable_thinking)
        return media, plan

    async def count_tokens(self, messages, *, enable_thinking: bool) -> PromptPlan:
        probe = GenerationRequest("count", messages, SamplingParams(),
                                  enable_thinking=enable_thinking)
        validate(probe)
        _, plan = await asyncio.to_thread(self._prepare, probe)
        return plan

    def kv_estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        return (prompt_tokens + max_new_tokens) * self.model.kv_bytes_per_token()

    def end_session(self, session_id: str) -> int | None:
        """Drop a session's cached state; None when the session is unknown."""
        return self.sessions.end(session_id)

    # ---- accounting -------------------------------------------------------------

    def running(self) -> list[RunningInfo]:
        with self._lock:
            return [RunningInfo(**vars(info)) for info in self._running.values()]

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def completed(self) -> int:
        return self._completed

    def modalities_in_use(self) -> set[str]:
        with self._lock:
            return set().union(*(info.modalities for info in self._running.values()))

    # ---- the model thread ---------------------------------------------------------

    @property
    def admission(self) -> Admission:
        return self._admission

    def set_admission(self, admission: Admission) -> None:
        with self._admission_changed:
            self._admission = admission
            self._admission_changed.notify_all()
        log.info("admission_changed", mode=admission.mode, max_running=admission.max_running)

    def _wait_for_admission(self) -> None:
        """Block the model loop while paused, failing queued requests that waited too long."""
        with self._admission_changed:
            while self._admission.mode == "paused" and not self._stopping:
                self._admission_changed.wait(timeout=0.2)
                self._expire_queued()

    def _expire_queued(self) -> None:
        kept: list[_Job] = []
        now = time.monotonic()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job.request is not None and now - job.enqueued_at > self.config.queue_timeout_s:
                with self._lock:
                    self._queued -= 1
                job.handle.push(_Failed(ResourceExhausted(
                    "admission is paused under memory pressure; retry later",
                    resource="admission", retry_after_s=2.0,
                )))
            else:
                kept.append(job)
        for job in kept:
            self._queue.put(job)

    def _run(self) -> None:
        while True:
            self._wait_for_admission()
            try:
                job = self._queue.get(timeout=1.0)
            except queue.Empty:
                self.sessions.expire_idle()
                continue
            if job.request is None:
                return
            if self._admission.mode == "paused" and not self._stopping:
                self._queue.put(job)  # paused while we waited for work: put it back
                continue
            with self._lock:
                self._queued -= 1
            handle = job.handle
            if handle.cancellation.requested:
                handle.push(Finished(FinishReason.CANCELLED, self._usage(job, 0)))
                continue
            info = RunningInfo(job.request.request_id, job.request.session_id,
                               job.request.modalities, len(job.plan.input_ids))
            with self._lock:
                self._running[info.request_id] = info
            try:
                handle.push(self._generate(job, info))
            except torch.OutOfMemoryError:
                log.warning("out_of_memory", request_id=info.request_id)
                handle.push(_Failed(ResourceExhausted(
                    "out of memory while generating; retry later", resource="memory",
                    retry_after_s=2.0,
                )))
            except Exception as exc:  # one request's failure must not stop the loop
                log.exception("generation_failed", request_id=info.request_id)
                handle.push(_Failed(exc))
            finally:
                with self._lock:
                    self._running.pop(info.request_id, None)
                    self._completed += 1

    def _generate(self, job: _Job, info: RunningInfo) -> Finished:
        request, plan, model = job.request, job.plan, self.model
        started = time.monotonic()
        reuse = None
        if request.session_id or self.config.prefix_caching:
            reuse = self.sessions.take(request.session_id, plan.content)
        cached = reuse.tokens if reuse else 0
        self._make_room(self.kv_estimate(len(plan.input_ids), job.max_new_tokens))
        inputs = model.generation_inputs(plan, job.media, cached=cached)
        text = TextStream(model.tokenizer, request.sampling.stop_sequences,
                          start_in_reasoning=self._starts_in_reasoning(request, plan))

        def emit(delta) -> None:
            info.generated_tokens = len(streamer.token_ids)
            job.handle.push(delta)

        streamer = DeltaStreamer(text, emit, reasoning=request.return_reasoning)
        cancellation = job.handle.cancellation
        eos_ids = model.eos_token_ids
        seed = request.sampling.seed
        torch.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(7), "little"))
        with model.decoder_unit.use() as decoder, torch.inference_mode():
            cache = reuse.cache if reuse else DynamicCache(config=decoder.config)
            decoder.generate(
                **inputs,
                generation_config=generation_config(
                    request.sampling, max_new_tokens=job.max_new_tokens, eos_ids=eos_ids,
                    pad_id=model.placeholder_id),
                logits_processor=LogitsProcessorList(self._penalties(request, plan)),
                stopping_criteria=[StopWhen(lambda: cancellation.requested or text.stopped)],
                streamer=streamer,
                past_key_values=cache,
            )
        reason = finish_reason(streamer, cancellation, eos_ids=eos_ids,
                               max_new_tokens=job.max_new_tokens)
        if reason is not FinishReason.CANCELLED:
            self.sessions.put(request.session_id, request.request_id,
                              plan.content + streamer.token_ids, cache)
            self._make_room(0)
        del cache
        usage = self._usage(job, len(streamer.token_ids))
        usage.reasoning_tokens = streamer.reasoning_tokens
        usage.cached_prompt_tokens = cached
        log.info("generation_finished", request_id=request.request_id, finish_reason=reason.value,
                 prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                 cached_prompt_tokens=cached, reuse=reuse.source if reuse else None,
                 seconds=round(time.monotonic() - started, 4))
        return Finished(reason, usage, text.matched_stop, images=self._image_sizes(job.media))

    def _make_room(self, needed: int) -> None:
        """Evict idle cached KV (LRU) until `needed` more bytes fit in the budget."""
        excess = self.sessions.total_bytes() + needed - self.config.kv_budget_bytes
        if excess > 0:
            result = self.sessions.evict_lru(excess)
            log.info("kv_evicted", freed_bytes=result.freed_bytes, entries=result.sessions,
                     reason="budget")

    def _starts_in_reasoning(self, request: GenerationRequest, plan: PromptPlan) -> bool:
        if not request.enable_thinking:
            return False
        tail = self.model.tokenizer.decode(plan.input_ids[-8:])
        return tail.rstrip().endswith(THINK_OPEN)

    @staticmethod
    def _penalties(request: GenerationRequest, plan: PromptPlan) -> list:
        sampling = request.sampling
        if not (sampling.frequency_penalty or sampling.presence_penalty):
            return []
        return [FrequencyPresencePenalty(sampling.frequency_penalty, sampling.presence_penalty,
                                         len(plan.input_ids))]

    @staticmethod
    def _usage(job: _Job, completion_tokens: int) -> Usage:
        return Usage(
            prompt_tokens=len(job.plan.input_ids), completion_tokens=completion_tokens,
            image_tokens=job.plan.image_tokens, audio_tokens=job.plan.audio_tokens,
        )

    @staticmethod
    def _image_sizes(media: DecodedMedia) -> list[ImageSize]:
        return [
            ImageSize(img.image.width, img.image.height, *img.original_size) for img in media.images
        ]


ROLES = {"system", "user", "assistant"}


def validate(request: GenerationRequest) -> None:
    if not request.messages:
        raise InvalidRequest("messages must not be empty", field="messages")
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be system, user or assistant",
                                 field=f"messages[{i}].role")
        if not message.parts:
            raise InvalidRequest(f"messages[{i}].parts must not be empty",
                                 field=f"messages[{i}].parts")
    s = request.sampling
    checks = [
        (s.max_new_tokens >= 1, "sampling.max_new_tokens", "must be at least 1"),
        (s.max_new_tokens <= 32_768, "sampling.max_new_tokens", "must be at most 32768"),
        (0 <= s.temperature <= 2, "sampling.temperature", "must be in [0, 2]"),
        (0 < s.top_p <= 1, "sampling.top_p", "must be in (0, 1]"),
        (s.top_k >= 0, "sampling.top_k", "must not be negative"),
        (0 < s.repetition_penalty <= 10, "sampling.repetition_penalty", "must be in (0, 10]"),
        (-2 <= s.frequency_penalty <= 2, "sampling.frequency_penalty", "must be in [-2, 2]"),
        (-2 <= s.presence_penalty <= 2, "sampling.presence_penalty", "must be in [-2, 2]"),
        (len(s.stop_sequences) <= 16, "sampling.stop_sequences", "at most 16 are allowed"),
        (all(0 < len(x) <= 256 for x in s.stop_sequences), "sampling.stop_sequences",
         "each must be 1 to 256 characters"),
    ]
    for ok, name, message in checks:
        if not ok:
            raise InvalidRequest(f"{name} {message}", field=name)
