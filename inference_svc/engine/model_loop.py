"""The model thread: admits queued jobs into a running batch and decodes it step by step.

Continuous batching: a job that arrives while others run is prefilled and joins the
batch at the next step. Each sequence keeps its own sampling state (transformers'
logits processors, its own seeded generator), so batching does not change what a
seeded request generates. Models without a `prefill` method (native GLM-4.1V) run one
request at a time through transformers' generate().

Containment: no exception ends the loop. A failure is attributed to the request it
belongs to (a row whose scores are not finite, a prefill, a stream), which fails alone;
an error in work the requests share fails those in flight, and the loop goes on.
`heartbeat` tells the service's watchdog that the loop is alive and making progress.
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from dataclasses import dataclass

import structlog
import torch
from transformers import DynamicCache, LogitsProcessorList

from inference_svc.bounds import clip
from inference_svc.engine import kv_cache
from inference_svc.engine.batch import DecodeBatch, NonFiniteScores, Row, Sampler, choose_tokens
from inference_svc.engine.generation import (
    DeltaStreamer,
    FrequencyPresencePenalty,
    StopWhen,
    finish_reason,
    generation_config,
)
from inference_svc.engine.jobs import Admission, Failed, Job, RunningInfo
from inference_svc.engine.sessions import Reuse, SessionStore
from inference_svc.engine.text_stream import THINK_OPEN, TextStream
from inference_svc.engine.types import Finished, FinishReason, GenerationRequest, ImageSize, Usage
from inference_svc.errors import GenerationFailed, NotReady, ResourceExhausted, ServiceError
from inference_svc.memory.process import release_freed_memory
from inference_svc.model.prompt import PromptPlan

log = structlog.get_logger("engine")
# Share of the KV budget kept free at admission for the running rows to grow into.
ADMISSION_WATERMARK = 0.01
RESUME_FIRST = -(2**61)  # queue position of preempted jobs: before every fresh one


@dataclass
class Sequence:
    job: Job
    info: RunningInfo
    row: Row
    sampler: Sampler
    history: torch.Tensor
    streamer: DeltaStreamer
    text: TextStream
    reuse: Reuse | None
    started: float
    pending_logits: torch.Tensor | None = None  # from prefill, until the first token

    @property
    def generated(self) -> int:
        return len(self.streamer.token_ids)


@dataclass
class Prefill:
    """A prompt fed through the decoder a chunk at a time, between decode steps."""

    job: Job
    plan: PromptPlan
    cache: DynamicCache  # holds every position before `done`
    embeds: torch.Tensor  # decoder inputs of the positions from `cached` on
    cached: int  # positions that came from a reused prefix
    done: int  # positions in the cache
    reuse: Reuse | None = None
    resumed: Sequence | None = None  # a preempted sequence being recomputed

    @property
    def remaining(self) -> int:
        return len(self.plan.input_ids) - self.done


class ModelLoop:
    def __init__(self, model, config, sessions: SessionStore) -> None:
        self.model = model
        self.config = config
        self.sessions = sessions
        self.queue: queue.PriorityQueue[Job] = queue.PriorityQueue()
        self.lock = threading.Lock()
        self.running: dict[str, RunningInfo] = {}
        self.queued = 0
        self.completed = 0
        self.stopping = False
        self.heartbeat = time.monotonic()  # last sign of progress, for the watchdog
        self._jobs: dict[str, Job] = {}  # admitted and not yet retired, by request id
        self.admission = Admission()
        self._admission_changed = threading.Condition()
        self._sequence = itertools.count()
        self._batched = hasattr(model, "prefill_chunk")
        self._prefilling: list[Prefill] = []  # admitted prompts not yet fully in KV
        self._thread = threading.Thread(target=self._run, name="model-loop", daemon=True)

    # ---- control from other threads ----------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        """Work is waiting or running (so the heartbeat must keep moving)."""
        with self.lock:
            return bool(self.queued or self.running)

    def stop(self, timeout: float) -> None:
        with self.lock:  # no job is queued behind the stop (it would never be answered)
            self.stopping = True
            self.queue.put(Job((-(2**62), -1), None))
        with self._admission_changed:
            self._admission_changed.notify_all()
        self._thread.join(timeout)

    def enqueue(self, job: Job) -> None:
        with self.lock:
            if self.stopping:
                raise NotReady("the service is shutting down")
            if self.queued >= self.config.max_queued:
                raise ResourceExhausted(
                    f"request queue is full ({self.config.max_queued} waiting)",
                    resource="queue", retry_after_s=1.0,
                )
            self.queued += 1
            job.sort_key = (-job.request.priority, next(self._sequence))
            self.queue.put(job)

    def set_admission(self, admission: Admission) -> None:
        with self._admission_changed:
            self.admission = admission
            self._admission_changed.notify_all()

    # ---- the loop ----------------------------------------------------------------

    def _capacity(self) -> int:
        admission = self.admission
        if admission.mode != "open" and admission.lapsed:
            log.warning("admission_lease_lapsed", mode=admission.mode)
            self.set_admission(Admission())
            admission = self.admission
        most = self.config.max_batch if self._batched else 1
        if admission.mode == "paused":
            return 0
        if admission.mode == "limited":
            return min(admission.max_running, most)
        return most

    def _run(self) -> None:
        batch = DecodeBatch()
        sequences: dict[str, Sequence] = {}
        while True:
            self.heartbeat = time.monotonic()
            try:
                if not self._iterate(batch, sequences):
                    return
            except Exception as error:  # shared work failed: contain it, keep serving
                self._contain(error, batch, sequences)

    def _iterate(self, batch: DecodeBatch, sequences: dict[str, Sequence]) -> bool:
        """Admit what fits, start it, decode one step; False once told to stop."""
        admitted: list[Job] = []
        job = self._next_job(block=not (sequences or self._prefilling))
        while job is not None:
            if job.request is None:
                self._cancel_everything(batch, sequences)
                return False
            if not (self._fits(job) or self._preempt_for(job, batch, sequences)):
                self._hold(job)
                break
            self._register(job)
            admitted.append(job)
            job = self._next_job(block=False)  # everything waiting joins this round
        if admitted:
            self._start_all(admitted, batch, sequences)
        if self._prefilling:
            self._prefill_step(batch, sequences)
        if sequences:
            self._step(batch, sequences)
        return True

    def _contain(self, error: Exception, batch: DecodeBatch,
                 sequences: dict[str, Sequence]) -> None:
        """An error outside any one request's work: every request in flight fails (their
        shared state cannot be trusted), the batch starts empty, the loop goes on."""
        log.error("model_loop_error", error_type=type(error).__name__,
                  error=_brief(error), in_flight=len(self._jobs), exc_info=error)
        batch.rows, batch.cache, batch.mask = [], None, None
        sequences.clear()
        self._prefilling.clear()
        failure = GenerationFailed("internal error in the model loop; retry the request")
        for job in list(self._jobs.values()):
            self._fail(job, job.info, failure)

    def _cancel_everything(self, batch: DecodeBatch, sequences: dict[str, Sequence]) -> None:
        """Shutdown: every running and waiting request ends with CANCELLED and its usage."""
        for sequence in list(sequences.values()):
            sequence.job.handle.cancel()
            self._finish(sequence, None, sequences)
        batch.rows, batch.cache, batch.mask = [], None, None
        self._prefilling.clear()
        for job in list(self._jobs.values()):  # admitted but not started
            self._end_unstarted(job)
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job.request is not None:
                with self.lock:
                    self.queued -= 1
                self._end_unstarted(job)

    def _end_unstarted(self, job: Job) -> None:
        job.handle.cancel()
        if job.info is not None:
            self._retire(job.info)
        else:
            with self.lock:
                self.completed += 1
        generated = job.resume.generated if job.resume is not None else 0
        job.handle.push(Finished(FinishReason.CANCELLED, _usage(job, generated)))

    def _next_job(self, *, block: bool) -> Job | None:
        while True:
            self.heartbeat = time.monotonic()
            if self.admission.mode == "paused" and not self.stopping:
                self._expire_queued()
            if len(self.running) >= self._capacity() and not self.stopping:
                if not block:
                    return None
                with self._admission_changed:
                    self._admission_changed.wait(timeout=0.2)
                continue
            try:
                job = self.queue.get(timeout=1.0) if block else self.queue.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                self.sessions.expire_idle()
                continue
            if job.request is None:
                return job
            if len(self.running) >= self._capacity() and not self.stopping:
                self.queue.put(job)  # admission closed while we waited: not yet
                continue
            with self.lock:
                self.queued -= 1
            if job.handle.cancellation.requested:
                self._end_unstarted(job)
                continue
            return job

    def _expire_queued(self) -> None:
        kept: list[Job] = []
        now = time.monotonic()
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job.request is not None and now - job.enqueued_at > self.config.queue_timeout_s:
                with self.lock:
                    self.queued -= 1
                job.handle.push(Failed(ResourceExhausted(
                    "admission is paused under memory pressure; retry later",
                    resource="admission", retry_after_s=2.0,
                )))
            else:
                kept.append(job)
        for job in kept:
            self.queue.put(job)

    # ---- KV admission and preemption ---------------------------------------------------

    def held_bytes(self, *, excluding: str = "") -> int:
        """KV held by admitted requests: their prompts and the tokens generated so far."""
        with self.lock:
            tokens = sum(r.prompt_tokens + r.generated_tokens for r in self.running.values()
                         if r.request_id != excluding)
        return tokens * self.model.kv_bytes_per_token()

    def _fits(self, job: Job) -> bool:
        """Whether the job's prompt (and what a preempted job had generated) fits beside
        what is held, with a watermark left for the running rows to grow, after evicting
        idle caches if needed. Admission counts what is used, not what may be."""
        generated = job.resume.generated if job.resume is not None else 0
        tokens = len(job.plan.input_ids) + generated
        watermark = int(ADMISSION_WATERMARK * self.config.kv_budget_bytes)
        return self._make_room(tokens * self.model.kv_bytes_per_token() + watermark)

    def _make_decode_room(self, batch: DecodeBatch, sequences: dict[str, Sequence]) -> None:
        """Before a decode step every row takes one more token of KV: evict idle caches,
        then preempt the lowest-priority, newest sequences until it fits."""
        while not self._make_room(len(batch) * self.model.kv_bytes_per_token()):
            if len(sequences) <= 1:  # a lone sequence always fits by admission's rule
                return
            victim = min(sequences.values(), key=lambda s: (s.job.request.priority, -s.started))
            self._preempt(victim, batch, sequences, reason="kv_budget")

    def _preempt_for(self, job: Job, batch: DecodeBatch, sequences: dict[str, Sequence]) -> bool:
        """Last resort: preempt lower-priority sequences (newest first) to fit `job`."""
        priority = job.request.priority
        victims = sorted((s for s in sequences.values() if s.job.request.priority < priority),
                         key=lambda s: (s.job.request.priority, -s.started))
        for victim in victims:
            self._preempt(victim, batch, sequences, reason="priority")
            if self._fits(job):
                return True
        return False

    def _preempt(self, sequence: Sequence, batch: DecodeBatch,
                 sequences: dict[str, Sequence], *, reason: str) -> None:
        """Free a running sequence's KV and re-queue it; it resumes by recomputation."""
        key = sequence.info.request_id
        batch.remove({key})
        sequences.pop(key, None)
        with self.lock:
            self.running.pop(key, None)
            self._jobs.pop(key, None)
            self.queued += 1
        job = sequence.job
        log.info("preempted", request_id=key, priority=job.request.priority,
                 generated_tokens=sequence.generated, reason=reason)
        # ahead of fresh jobs of its priority: it was admitted before them
        self.queue.put(Job((-job.request.priority, RESUME_FIRST + next(self._sequence)),
                           job.request, job.plan, job.media, job.max_new_tokens, job.handle,
                           resume=sequence))

    def _hold(self, job: Job) -> None:
        """Not enough KV yet: wait in the queue, up to the queue timeout (a preempted
        job waits as long as it takes: it was admitted once and is never dropped)."""
        waited = time.monotonic() - job.enqueued_at
        if job.resume is None and waited > self.config.queue_timeout_s:
            job.handle.push(Failed(ResourceExhausted(
                "KV cache budget is fully used by running requests; retry later",
                resource="kv_cache", retry_after_s=1.0,
            )))
            return
        if not job.waiting:  # once per job: what admission saw when it first said no
            job.waiting = True
            log.info("admission_waiting", request_id=job.request.request_id,
                     prompt_tokens=len(job.plan.input_ids), held_bytes=self.held_bytes(),
                     cached_bytes=self.sessions.total_bytes(),
                     budget_bytes=self.config.kv_budget_bytes, running=len(self.running))
        with self.lock:
            self.queued += 1
        self.queue.put(job)

    def _register(self, job: Job) -> None:
        request = job.request
        info = RunningInfo(request.request_id, request.session_id, request.modalities,
                           len(job.plan.input_ids), priority=request.priority)
        if job.resume is not None:
            info.generated_tokens = job.resume.generated
        job.info = info
        with self.lock:
            self.running[info.request_id] = info
            self._jobs[info.request_id] = job

    def _start_all(self, jobs: list[Job], batch: DecodeBatch,
                   sequences: dict[str, Sequence]) -> None:
        """Start admitted jobs: short fresh prompts are prefilled together at once and
        sample their first tokens; the rest queue for chunked prefill.

        A job whose deadline passed or whose client left while it waited is not started.
        """
        together: list[Job] = []
        for job in jobs:
            if job.handle.cancellation.requested:
                self._end_unstarted(job)
            elif job.resume is not None:
                self._begin_resume(job.resume, job.info)
            elif not self._batched:
                self._run_alone(job)
            else:
                reuse = self._reuse(job.request, job.plan)
                if reuse is None and len(job.plan.input_ids) <= self._chunk_tokens:
                    together.append(job)
                else:
                    self._begin_prefill(job, job.plan, reuse)
        if len(together) == 1:
            self._begin_prefill(together[0], together[0].plan, None)
        elif together:
            self._start(self._prefill_together(together, batch), batch, sequences)

    def _start(self, started: list[Sequence], batch: DecodeBatch,
               sequences: dict[str, Sequence]) -> None:
        """Prefilled sequences sample their first tokens and run from now on."""
        if not started:
            return
        for sequence in started:
            sequences[sequence.info.request_id] = sequence
        choices = choose_tokens([s.sampler for s in started], [s.history for s in started],
                                torch.stack([s.pending_logits for s in started]))
        self._advance(started, choices, batch, sequences)

    def _advance(self, running: list[Sequence], choices: list, batch: DecodeBatch,
                 sequences: dict[str, Sequence]) -> None:
        """Hand each sequence its chosen token; a sequence that failed leaves alone."""
        done: set[str] = set()
        failed: dict[str, Exception] = {}
        for sequence, choice in zip(running, choices, strict=True):
            key = sequence.info.request_id
            if isinstance(choice, Exception):
                failed[key] = choice
                continue
            try:
                if self._accept(sequence, choice):
                    done.add(key)
            except Exception as error:
                failed[key] = error
        for key, error in failed.items():
            batch.remove({key})
            sequence = sequences.pop(key)
            self._fail(sequence.job, sequence.info, error)
        for key, cache in batch.remove(done).items():
            self._finish(sequences[key], cache, sequences)

    def _run_alone(self, job: Job) -> None:
        try:
            finished = self._generate_alone(job, job.info)
        except Exception as error:  # one request's failure must not stop the loop
            self._fail(job, job.info, error)
            return
        self._retire(job.info)
        job.handle.push(finished)

    @property
    def _chunk_tokens(self) -> int:
        return self.config.prefill_chunk_tokens or self.model.context_length

    def _begin_prefill(self, job: Job, plan: PromptPlan, reuse: Reuse | None, *,
                       resumed: Sequence | None = None) -> None:
        """Queue a prompt for chunked prefill (its media are encoded now)."""
        cached = reuse.tokens if reuse else 0
        try:
            embeds = self._with_one_retry(
                lambda: self.model.prompt_embeddings(plan, job.media, cached=cached))
        except Exception as error:
            self._fail(job, job.info, error)
            return
        self._prefilling.append(Prefill(job, plan, reuse.cache if reuse else DynamicCache(),
                                        embeds, cached, cached, reuse, resumed))

    def _begin_resume(self, sequence: Sequence, info: RunningInfo) -> None:
        """Recompute a preempted sequence's KV (all but its last, unfed token)."""
        job = sequence.job
        fed = sequence.history[0, :-1].tolist()
        plan = PromptPlan(input_ids=fed, spans=job.plan.spans,
                          content=job.plan.content + fed[len(job.plan.input_ids):])
        sequence.info = info
        self._begin_prefill(job, plan, None, resumed=sequence)

    def _prefill_step(self, batch: DecodeBatch, sequences: dict[str, Sequence]) -> None:
        """Feed queued prompts: every one that needs at most a chunk completes now, then
        the oldest longer one advances by a chunk, so a long prompt delays the rest by at
        most one chunk. Cancelled ones stop here, before their next chunk; completed ones
        join the batch."""
        for prefill in [p for p in self._prefilling if p.job.handle.cancellation.requested]:
            self._prefilling.remove(prefill)
            self._stop_prefill(prefill, sequences)
        chunk = self._chunk_tokens
        short = [p for p in self._prefilling if p.remaining <= chunk]
        longer = [p for p in self._prefilling if p.remaining > chunk]
        started: list[Sequence] = []
        for prefill in short + longer[:1]:
            end = prefill.done + min(prefill.remaining, chunk)
            try:
                logits = self._with_one_retry(lambda p=prefill, e=end: self.model.prefill_chunk(
                    p.embeds, p.cache, p.done, e, cached=p.cached))
            except Exception as error:
                self._prefilling.remove(prefill)
                self._fail(prefill.job, prefill.job.info, error)
                continue
            prefill.done = end
            self.heartbeat = time.monotonic()
            if prefill.remaining:
                continue
            self._prefilling.remove(prefill)
            if prefill.resumed is not None:
                self._rejoin(prefill, batch, sequences)
            else:
                sequence = self._new_sequence(prefill.job, prefill.job.info, prefill.reuse,
                                              logits)
                batch.add(sequence.row, prefill.cache)
                started.append(sequence)
        self._start(started, batch, sequences)

    def _rejoin(self, prefill: Prefill, batch: DecodeBatch,
                sequences: dict[str, Sequence]) -> None:
        sequence = prefill.resumed
        key = sequence.info.request_id
        sequence.row = Row(key, prefill.done, next_token=sequence.row.next_token)
        sequences[key] = sequence
        batch.add(sequence.row, prefill.cache)
        log.info("resumed", request_id=key, recomputed_tokens=prefill.done)

    def _stop_prefill(self, prefill: Prefill, sequences: dict[str, Sequence]) -> None:
        """Cancelled or past its deadline mid-prefill: the work stops, nothing is kept but
        a reused prefix, which goes back intact."""
        job, deadline = prefill.job, prefill.job.request.deadline
        log.info("prefill_stopped", request_id=job.request.request_id,
                 prompt_tokens=len(prefill.plan.input_ids),
                 computed_tokens=prefill.done - prefill.cached,
                 chunk_tokens=self._chunk_tokens,
                 past_deadline_s=None if deadline is None
                 else round(time.monotonic() - deadline, 3))
        if prefill.reuse is not None:
            kv_cache.truncate(prefill.cache, prefill.cached)
            self.sessions.put(job.request.session_id, job.request.request_id,
                              prefill.plan.content[:prefill.cached], prefill.cache)
        if prefill.resumed is not None:
            self._finish(prefill.resumed, None, sequences)
        else:
            self._end_unstarted(job)

    def _prefill_together(self, jobs: list[Job], batch: DecodeBatch) -> list[Sequence]:
        """Short prompts in one padded pass; if that fails, each is queued on its own so
        that only the culprit fails."""
        try:
            logits, cache, mask = self.model.prefill_batch([j.plan for j in jobs],
                                                           [j.media for j in jobs])
        except Exception as error:
            log.warning("batched_prefill_failed", error_type=type(error).__name__,
                        error=_brief(error), jobs=len(jobs))
            for job in jobs:
                self._begin_prefill(job, job.plan, None)
            return []
        started = [self._new_sequence(job, job.info, None, logits[i])
                   for i, job in enumerate(jobs)]
        batch.add_many([s.row for s in started], cache, mask)
        return started

    def _new_sequence(self, job: Job, info: RunningInfo, reuse: Reuse | None,
                      logits: torch.Tensor) -> Sequence:
        plan = job.plan
        text, streamer = self._open_stream(job)
        streamer.put(torch.tensor(plan.input_ids))  # the prompt: not streamed back
        sampler = Sampler.create(job.request.sampling, prompt_length=len(plan.input_ids),
                                 eos_ids=self.model.eos_token_ids, seed=_seed(job.request),
                                 grammar=job.request.grammar)  # response format (issue 13)
        return Sequence(
            job=job, info=info, row=Row(info.request_id, len(plan.input_ids)),
            sampler=sampler, history=torch.tensor([plan.input_ids]), streamer=streamer,
            text=text, reuse=reuse, started=time.monotonic(), pending_logits=logits,
        )

    def _open_stream(self, job: Job) -> tuple[TextStream, DeltaStreamer]:
        """The request's text pipeline and the streamer that feeds its client."""
        request = job.request
        text = TextStream(self.model.tokenizer, request.sampling.stop_sequences,
                          start_in_reasoning=self._starts_in_reasoning(request, job.plan))

        # the handle's own push, not a closure over the streamer: a streamer <-> closure
        # cycle kept each finished Job (its decoded images and audio) alive until a full
        # garbage collection, and RSS grew ~25 MB/min under mixed traffic
        streamer = DeltaStreamer(text, job.handle.push, reasoning=request.return_reasoning)
        return text, streamer

    def _accept(self, sequence: Sequence, token: int) -> bool:
        """Stream a chosen token; True when the sequence is done."""
        sequence.history = torch.cat([sequence.history, torch.tensor([[token]])], dim=1)
        sequence.row.next_token = token
        sequence.streamer.add_logprobs(sequence.sampler.take_logprobs())  # issue 13
        sequence.streamer.put(torch.tensor([token]))
        sequence.info.generated_tokens = sequence.generated
        return (
            token in self.model.eos_token_ids
            or sequence.generated >= sequence.job.max_new_tokens
            or sequence.text.stopped
            or sequence.job.handle.cancellation.requested
        )

    def _step(self, batch: DecodeBatch, sequences: dict[str, Sequence]) -> None:
        cancelled = {k for k, s in sequences.items() if s.job.handle.cancellation.requested}
        for key, cache in batch.remove(cancelled).items():
            self._finish(sequences[key], cache, sequences)
        if not sequences:
            return
        self._make_decode_room(batch, sequences)
        try:
            logits = self._with_one_retry(lambda: self._decode(batch))
        except torch.OutOfMemoryError as error:
            # still out of memory after a trim: the newest sequence alone fails
            newest = max(sequences.values(), key=lambda s: s.started)
            batch.remove({newest.info.request_id})
            del sequences[newest.info.request_id]
            self._fail(newest.job, newest.info, error)
            return
        except Exception as error:
            log.error("decode_step_failed", batch=len(batch), error_type=type(error).__name__,
                      error=_brief(error), exc_info=error)
            for key, sequence in list(sequences.items()):
                del sequences[key]
                self._fail(sequence.job, sequence.info, error)
            batch.remove({r.key for r in batch.rows})
            return
        self.heartbeat = time.monotonic()
        running = [sequences[row.key] for row in batch.rows]
        choices = choose_tokens([s.sampler for s in running], [s.history for s in running],
                                logits)
        self._advance(running, choices, batch, sequences)

    def _decode(self, batch: DecodeBatch) -> torch.Tensor:
        with self.model.decoder_unit.use() as decoder:
            return batch.step(decoder)

    def _with_one_retry(self, work):
        """Run `work`; on out-of-memory, drop every idle cache, release memory, try once more."""
        try:
            return work()
        except torch.OutOfMemoryError:
            freed = self.sessions.evict_lru(0)
            release_freed_memory()
            log.warning("out_of_memory_retry", freed_bytes=freed.freed_bytes,
                        evicted=len(freed.sessions))
            return work()

    def _finish(self, sequence: Sequence, cache: DynamicCache | None,
                sequences: dict[str, Sequence]) -> None:
        sequences.pop(sequence.info.request_id, None)
        try:
            sequence.streamer.end()
            finished = self._conclude(sequence.job, sequence.streamer, sequence.text,
                                      sequence.reuse, cache, sequence.started)
        except Exception as error:
            self._fail(sequence.job, sequence.info, error)
            return
        # retire first: a client that reads the account after its final message must
        # not see its KV twice (as running and as the idle cache it became)
        self._retire(sequence.info)
        sequence.job.handle.push(finished)

    def _conclude(self, job: Job, streamer: DeltaStreamer, text: TextStream,
                  reuse: Reuse | None, cache: DynamicCache | None,
                  started: float) -> Finished:
        """Why it ended, keep its KV for reuse unless cancelled, account and log it."""
        request = job.request
        reason = finish_reason(streamer, job.handle.cancellation,
                               eos_ids=self.model.eos_token_ids,
                               max_new_tokens=job.max_new_tokens)
        if reason is not FinishReason.CANCELLED and cache is not None:
            if not kv_cache.all_finite(cache):  # never hand a poisoned cache to anyone
                raise NonFiniteScores()
            self.sessions.put(request.session_id, request.request_id,
                              job.plan.content + streamer.token_ids, cache)
            self._make_room(0, excluding=request.request_id)
        usage = _usage(job, len(streamer.token_ids))
        usage.reasoning_tokens = streamer.reasoning_tokens
        usage.cached_prompt_tokens = reuse.tokens if reuse else 0
        log.info("generation_finished", request_id=request.request_id,
                 finish_reason=reason.value, prompt_tokens=usage.prompt_tokens,
                 completion_tokens=usage.completion_tokens,
                 cached_prompt_tokens=usage.cached_prompt_tokens,
                 reuse=reuse.source if reuse else None,
                 seconds=round(time.monotonic() - started, 4))
        return Finished(reason, usage, text.matched_stop, images=_image_sizes(job))

    def _fail(self, job: Job, info: RunningInfo | None, error: BaseException) -> None:
        if isinstance(error, torch.OutOfMemoryError):
            log.warning("out_of_memory", request_id=job.request.request_id)
            error = ResourceExhausted("out of memory while generating; retry later",
                                      resource="memory", retry_after_s=2.0)
        elif isinstance(error, ServiceError):
            log.warning("generation_failed", request_id=job.request.request_id,
                        reason=error.reason, error=_brief(error))
        else:
            log.error("generation_failed", request_id=job.request.request_id,
                      error_type=type(error).__name__, error=_brief(error), exc_info=error)
        job.handle.push(Failed(error))
        if info is not None:
            self._retire(info)

    def _retire(self, info: RunningInfo) -> None:
        with self.lock:
            self.running.pop(info.request_id, None)
            self._jobs.pop(info.request_id, None)
            self.completed += 1
        with self._admission_changed:
            self._admission_changed.notify_all()

    # ---- KV reuse and budget ------------------------------------------------------

    def _reuse(self, request: GenerationRequest, plan: PromptPlan) -> Reuse | None:
        if not (request.session_id or self.config.prefix_caching):
            return None
        reuse = self.sessions.take(request.session_id, plan.content)
        if reuse is not None and kv_cache.device_of(reuse.cache) != self.model.device:
            kv_cache.move(reuse.cache, self.model.device)  # it was offloaded to the host
        return reuse

    def kv_estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV a request holds at its longest: prompt plus every token it may generate."""
        return (prompt_tokens + max_new_tokens) * self.model.kv_bytes_per_token()

    def _make_room(self, needed: int, *, excluding: str = "") -> bool:
        """Evict idle cached KV (LRU) until `needed` more bytes fit in the budget; whether
        they do.

        `excluding` names a request whose KV is counted elsewhere (in `needed`, or in the
        session store once it finished), so not again as running.
        """
        def in_use() -> int:
            return self.sessions.total_bytes() + self.held_bytes(excluding=excluding) + needed

        excess = in_use() - self.config.kv_budget_bytes
        if excess > 0:
            result = self.sessions.evict_lru(excess)
            if result.sessions:
                log.info("kv_evicted", freed_bytes=result.freed_bytes, entries=result.sessions,
                         reason="budget")
        return in_use() <= self.config.kv_budget_bytes

    def _starts_in_reasoning(self, request: GenerationRequest, plan: PromptPlan) -> bool:
        if not request.enable_thinking:
            return False
        tail = self.model.tokenizer.decode(plan.input_ids[-8:])
        return tail.rstrip().endswith(THINK_OPEN)

    # ---- one request at a time, for models without prefill() -----------------------

    def _generate_alone(self, job: Job, info: RunningInfo) -> Finished:
        request, plan, model = job.request, job.plan, self.model
        started = time.monotonic()
        reuse = self._reuse(request, plan)
        inputs = model.generation_inputs(plan, job.media, cached=reuse.tokens if reuse else 0)
        text, streamer = self._open_stream(job)
        cancellation = job.handle.cancellation

        def should_stop() -> bool:
            self.heartbeat = time.monotonic()
            info.generated_tokens = len(streamer.token_ids)
            return cancellation.requested or text.stopped

        torch.manual_seed(_seed(request))
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
        return self._conclude(job, streamer, text, reuse, cache, started)


def _brief(error: BaseException) -> str:
    """An exception for the log: its message, cut short (never request content)."""
    return clip(str(error), 300)


def _seed(request: GenerationRequest) -> int:
    """The request's seed, or a fresh random one."""
    seed = request.sampling.seed
    return seed if seed is not None else int.from_bytes(os.urandom(7), "little")


def _usage(job: Job, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=len(job.plan.input_ids), completion_tokens=completion_tokens,
        image_tokens=job.plan.image_tokens, audio_tokens=job.plan.audio_tokens,
    )


def _image_sizes(job: Job) -> list[ImageSize]:
    return [ImageSize(i.image.width, i.image.height, *i.original_size) for i in job.media.images]
