"""The model thread: admits queued jobs, prefills their prompts a chunk at a time and
decodes every running sequence one token a step.

Each iteration reads: run control tasks -> schedule (admit what fits; the scheduler,
engine/scheduler.py, takes KV blocks and preempts when they run out) -> one forward for
the prompts' next chunks and every decoding sequence's next token together -> hand each
sequence its token, finish what ended -> publish the KV account. KV lives in blocks
(engine/kv_blocks.py); joining or leaving the batch moves no KV and pads nothing.

A request asking for n choices prefills its prompt once; then n sequences decode from
it, the first in the prompt's blocks, the others holding the same blocks (shared, not
copied: a block is copied only when a sequence writes into one that others read). Each
choice is preempted and resumes on its own; a cancel ends them all; the request ends
when its last choice does.

Each sequence keeps its own sampling state (its parameters, its own seeded generator,
engine/sampling.py), so batching does not change what a seeded request generates. A
model whose rope has several axes (GLM-4.1V) gives a prompt's positions with its inputs
and the offset of what follows; a sequence keeps that offset.

Containment: no exception ends the loop. A failure is attributed to the request it
belongs to (a row whose scores are not finite, a prefill, a stream), which fails alone;
an error in work the requests share fails those in flight, and the loop goes on.
`heartbeat` tells the service's watchdog that the loop is alive and making progress.

What it schedules (choices, sequences, prefills) and the orderings it decides by (which
prompts a prefill pass takes, which sequence is preempted first) are in sequences.py;
the waiting queue and the requests' bookkeeping, which other threads read, are in
request_queue.py.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import structlog
import torch

from autoglm_common.bounds import clip
from inference_svc.engine.compute_threads import use_compute_threads
from inference_svc.engine.jobs import Failed, Job, RunningInfo
from inference_svc.engine.kv_blocks import BlockLedger, KVAccount
from inference_svc.engine.output import (
    choice_end,
    choice_seed,
    choices_final,
    end_reason,
    final_event,
    open_stream,
    stop_reason,
    usage,
)
from inference_svc.engine.request_queue import RequestQueue
from inference_svc.engine.sampling import NonFiniteScores, Sampler, choose_tokens
from inference_svc.engine.scheduler import LoopHooks, Scheduler
from inference_svc.engine.sequences import Choices, Prefill, Sequence, choice_key, resume_plan
from inference_svc.engine.sessions import Reuse, SessionStore
from inference_svc.errors import GenerationFailed, ResourceExhausted, ServiceError
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.paged.kv_pool import RowSlots
from inference_svc.process_memory import release_freed_memory
from inference_svc.types import Finished, FinishReason

log = structlog.get_logger("engine")


class ModelLoop:
    def __init__(self, model, config, sessions: SessionStore, ledger: BlockLedger,
                 observer=None) -> None:
        self.model = model
        self.observer = observer  # told of admissions and preemptions (metrics)
        self.config = config
        self.sessions = sessions
        self.ledger = ledger
        self.requests = RequestQueue(max_queued=config.max_queued, max_batch=config.max_batch)
        self.heartbeat = time.monotonic()  # last sign of progress, for the watchdog
        self._tasks: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
        self.scheduler = Scheduler(
            ledger, sessions, chunk_tokens=config.prefill_chunk_tokens or model.context_length,
            prefix_caching=config.prefix_caching,
            hooks=LoopHooks(requeue=self.requests.requeue_preempted, settle=self._settle,
                            preempted=self._count_preemption))
        self._choices: dict[str, Choices] = {}  # requests decoding, by request id
        self._eos = frozenset(model.eos_token_ids)
        self.kv_account: KVAccount = self._account()
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
        return self.requests.busy

    def stop(self, timeout: float) -> None:
        self.requests.stop()
        self._thread.join(timeout)

    def call(self, work: Callable[[], object], timeout: float = 30.0) -> object:
        """Run `work` on the model thread between steps (KV blocks are the loop's alone);
        directly when the loop is not running."""
        if not self.alive:
            return work()
        done: Future = Future()
        self._tasks.put((work, done))
        self.requests.wake()
        return done.result(timeout)

    # ---- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        use_compute_threads(self.config.compute_threads)
        while True:
            self.heartbeat = time.monotonic()
            try:
                if not self._iterate():
                    return
            except Exception as error:  # shared work failed: contain it, keep serving
                self._contain(error)

    def _iterate(self) -> bool:
        """Admit what fits, prefill a chunk, decode one step; False once told to stop."""
        sequences = self.scheduler.decoding
        self._run_tasks()
        admitted: list[Job] = []
        job = self._next_job(block=not (sequences or self.scheduler.prefilling))
        while job is not None:
            if job.request is None:
                self._cancel_everything()
                return False
            if not self.scheduler.admit(job):
                self._wait_for_room(job)
                break
            self._register(job)
            admitted.append(job)
            job = self._next_job(block=False)  # everything waiting joins this round
        if admitted:
            self._start_all(admitted)
        if self.scheduler.prefilling or sequences:
            self._pass()
        self._publish()
        return True

    def _run_tasks(self) -> None:
        while True:
            try:
                work, done = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                done.set_result(work())
            except Exception as error:
                done.set_exception(error)
            self._publish()

    def _publish(self) -> None:
        self.kv_account = self._account()

    def _account(self) -> KVAccount:
        return self.ledger.account()

    def _contain(self, error: Exception) -> None:
        """An error outside any one request's work: every request in flight fails (their
        shared state cannot be trusted), the loop goes on."""
        log.error("model_loop_error", error_type=type(error).__name__,
                  error=_brief(error), in_flight=len(self.requests.admitted()), exc_info=error)
        self.scheduler.decoding.clear()
        self.scheduler.prefilling.clear()
        failure = GenerationFailed("internal error in the model loop; retry the request")
        for job in self.requests.admitted():
            self._fail(job, job.info, failure)

    def _cancel_everything(self) -> None:
        """Shutdown: every running and waiting request ends with CANCELLED and its usage."""
        for sequence in list(self.scheduler.decoding.values()):
            sequence.job.handle.cancel()
            self._finish(sequence)
        for prefill in [p for p in self.scheduler.prefilling if p.resumed is not None]:
            self.scheduler.prefilling.remove(prefill)
            prefill.job.handle.cancel()
            self._finish(prefill.resumed)
        self.scheduler.prefilling.clear()
        for job in self.requests.admitted():  # admitted but not started
            self._end_unstarted(job)
        for job in self.requests.drain():
            if job.request is not None:
                self._end_unstarted(job)

    def _end_unstarted(self, job: Job) -> None:
        job.handle.cancel()
        if job.resume is not None:  # a preempted choice: it ends, cancelled
            self._finish(job.resume)
            return
        self._release(job.request.request_id)
        if job.info is not None:
            self.requests.retire(job.request.request_id)
        else:
            self.requests.ended_unadmitted()
        self._publish()
        job.handle.push(Finished(FinishReason.CANCELLED, usage(job, 0)))

    def _release(self, key: str) -> None:
        self.ledger.release(key, keep_cached=False)

    def _next_job(self, *, block: bool) -> Job | None:
        """The next request admission may take (None when none, or when as many run as
        the admission mode allows); blocking, it waits, running control tasks meanwhile."""
        requests = self.requests
        while True:
            self.heartbeat = time.monotonic()
            self._run_tasks()
            if requests.admission.mode == "paused" and not requests.stopping:
                self._expire_queued()
            if requests.full:
                if not block:
                    return None
                requests.wait_for_capacity(0.2)
                continue
            job = requests.get(block=block)
            if job is None:
                if not block:
                    return None
                self.sessions.expire_idle()
                continue
            if job.wake:
                continue
            if job.request is None:
                return job
            if requests.full:
                requests.back(job)  # admission closed while we waited: not yet
                continue
            if job.handle.cancellation.requested:
                self._end_unstarted(job)
                continue
            return job

    def _expire_queued(self) -> None:
        """While admission is paused, fresh requests past the queue timeout fail."""
        for job in self.requests.drain():
            if job.request is not None and self.requests.waited_too_long(
                    job, self.config.queue_timeout_s):
                job.handle.push(Failed(ResourceExhausted(
                    "admission is paused under memory pressure; retry later",
                    resource="admission", retry_after_s=2.0,
                )))
            elif not job.wake:
                self.requests.back(job)

    # ---- waiting -----------------------------------------------------------------------

    def _count_preemption(self, reason: str) -> None:
        self.requests.preemptions += 1
        if self.observer is not None:
            self.observer.request_preempted(reason)

    def _wait_for_room(self, job: Job) -> None:
        """Not enough KV yet: wait in the queue, up to the queue timeout (a preempted
        job waits as long as it takes: it was admitted once and is never dropped)."""
        if self.requests.waited_too_long(job, self.config.queue_timeout_s):
            job.handle.push(Failed(ResourceExhausted(
                "KV cache budget is fully used by running requests; retry later",
                resource="kv_cache", retry_after_s=1.0,
            )))
            return
        if not job.waiting:  # once per job: what admission saw when it first said no
            job.waiting = True
            account = self._account()
            log.info("admission_waiting", request_id=job.request.request_id,
                     prompt_tokens=len(job.plan.input_ids), held_bytes=account.held_bytes,
                     cached_bytes=account.cached_bytes, budget_bytes=account.budget_bytes,
                     running=len(self.requests.running))
        self.requests.back(job)

    def _register(self, job: Job) -> None:
        if self.requests.register(job) and job.resume is None and self.observer is not None:
            self.observer.request_admitted(time.monotonic() - job.enqueued_at)

    # ---- starting: prefill ---------------------------------------------------------------

    def _start_all(self, jobs: list[Job]) -> None:
        """Start admitted jobs: prompts queue for chunked prefill, swapped sequences
        rejoin the batch. A job whose deadline passed or whose client left while it
        waited is not started."""
        for job in jobs:
            if job.handle.cancellation.requested:
                if job.resume is not None:
                    self._finish(job.resume)
                else:
                    self._end_unstarted(job)
            elif job.resume is not None and job.resume.swapped:
                sequence = job.resume
                sequence.info, sequence.swapped = job.info, False
                self.scheduler.decoding[sequence.key] = sequence
                log.info("resumed", request_id=job.request.request_id, choice=sequence.index,
                         swapped_in_tokens=sequence.length)
            elif job.resume is not None:
                job.resume.info = job.info
                self._begin_prefill(job, resume_plan(job.resume), job.reuse,
                                    resumed=job.resume)
            else:
                self._begin_prefill(job, job.plan, job.reuse)

    def _begin_prefill(self, job: Job, plan: PromptPlan, reuse: Reuse | None, *,
                       resumed: Sequence | None = None) -> None:
        """Queue a prompt for chunked prefill (its media are encoded now)."""
        cached = reuse.tokens if reuse else 0
        try:
            inputs = self._with_one_retry(
                lambda: self.model.prompt_inputs(plan, job.media, cached=cached))
        except Exception as error:
            self._fail(job, job.info, error)
            return
        self.scheduler.prefilling.append(Prefill(job, plan, inputs, cached, cached, reuse, resumed))

    def _pass(self) -> None:
        """One forward: the next chunks of queued prompts (about one chunk of positions,
        less the decode rows) and every decoding sequence's next token together, so the
        weights are read once for both. A step with no prompt in flight decodes through
        `decode_paged` (a captured CUDA graph where there is one). Cancelled work stops
        first; completed prompts start decoding."""
        self._drop_cancelled()
        if self.scheduler.decoding:
            self.scheduler.make_decode_room()
        running = list(self.scheduler.decoding.values())
        work = self.scheduler.prefill_work(decode_rows=len(running))
        if not work:
            if running:
                self._decode_step(running)
            return
        if not running or not self.config.mixed_steps:
            self._prefill_pass(work)
            if running:
                self._decode_step(running)
            return
        try:
            logits = self._with_one_retry(lambda: self._feed(work, running))
        except Exception as error:  # each part alone, so that only the culprit fails
            log.warning("mixed_pass_failed", error_type=type(error).__name__,
                        error=_brief(error), prompts=len(work), rows=len(running))
            self._prefill_pass(work)
            self._decode_step(running)
            return
        self.heartbeat = time.monotonic()
        self._prefilled(work, list(logits[:len(work)]))
        self._decoded(running, logits[len(work):])

    def _drop_cancelled(self) -> None:
        prefilling = self.scheduler.prefilling
        for prefill in [p for p in prefilling if p.job.handle.cancellation.requested]:
            prefilling.remove(prefill)
            self._stop_prefill(prefill)
        for sequence in [s for s in self.scheduler.decoding.values()
                         if s.job.handle.cancellation.requested]:
            self._finish(sequence)

    def _prefill_pass(self, work: list[tuple[Prefill, int]]) -> None:
        """The prompts' chunks packed into one forward (`Scheduler.prefill_work`)."""
        try:
            logits = self._with_one_retry(lambda: self._feed(work))
        except Exception as error:
            if len(work) == 1:
                self.scheduler.prefilling.remove(work[0][0])
                self._fail(work[0][0].job, work[0][0].job.info, error)
                return
            log.warning("batched_prefill_failed", error_type=type(error).__name__,
                        error=_brief(error), prompts=len(work))
            logits = self._feed_each(work)
        self.heartbeat = time.monotonic()
        self._prefilled(work, logits)

    def _prefilled(self, work: list[tuple[Prefill, int]],
                   logits: list[torch.Tensor | None]) -> None:
        """Each prompt reached its chunk's end; a prompt now whole starts decoding."""
        started: list[Sequence] = []
        for (prefill, end), row_logits in zip(work, logits, strict=True):
            if row_logits is None:
                continue
            prefill.done = end
            if prefill.remaining:
                continue
            self.scheduler.prefilling.remove(prefill)
            self.ledger.seal(prefill.key, prefill.plan.content, prefill.done)
            if prefill.resumed is not None:
                self._rejoin(prefill)
            else:
                started.extend(self._new_sequences(prefill, row_logits))
        self._start(started)

    def _feed(self, work: list[tuple[Prefill, int]],
              running: list[Sequence] = ()) -> torch.Tensor:
        """The prompts' chunks, then the decoding sequences' next tokens, as the segments
        of one forward; logits after each segment, in that order."""
        ledger = self.ledger
        segments = [RowSlots(ledger.slots(p.key, p.done, end), ledger.slots(p.key, 0, end))
                    for p, end in work]
        segments += [RowSlots(ledger.slots(s.key, s.length, s.length + 1),
                              ledger.slots(s.key, 0, s.length + 1)) for s in running]
        spans = [(p.inputs, p.done - p.cached, end - p.cached) for p, end in work]
        inputs = [prompt.embeds[start:stop] for prompt, start, stop in spans]
        inputs += [torch.tensor([s.next_token]) for s in running]
        positions = None
        if any(prompt.positions is not None for prompt, _, _ in spans) or any(
                s.position_offset for s in running):
            positions = [None if prompt.positions is None else prompt.positions[:, start:stop]
                         for prompt, start, stop in spans]
            positions += [torch.tensor([[s.length + s.position_offset]]) for s in running]
        return self.model.forward_paged(ledger.pool, segments, inputs, positions)

    def _feed_each(self, work: list[tuple[Prefill, int]]) -> list[torch.Tensor | None]:
        """The prompts one by one, so that only the culprit fails."""
        out: list[torch.Tensor | None] = []
        for prefill, end in work:
            try:
                out.append(self._feed([(prefill, end)])[0])
            except Exception as error:
                self.scheduler.prefilling.remove(prefill)
                self._fail(prefill.job, prefill.job.info, error)
                out.append(None)
        return out

    def _rejoin(self, prefill: Prefill) -> None:
        sequence = prefill.resumed
        sequence.length = prefill.done
        self.scheduler.decoding[sequence.key] = sequence
        log.info("resumed", request_id=prefill.job.request.request_id, choice=sequence.index,
                 recomputed_tokens=prefill.done)

    def _stop_prefill(self, prefill: Prefill) -> None:
        """Cancelled or past its deadline mid-prefill: the work stops; the blocks already
        computed stay cached by content."""
        job, deadline = prefill.job, prefill.job.request.deadline
        log.info("prefill_stopped", request_id=prefill.key,
                 prompt_tokens=len(prefill.plan.input_ids),
                 computed_tokens=prefill.done - prefill.cached,
                 chunk_tokens=self.scheduler.chunk_tokens,
                 past_deadline_s=None if deadline is None
                 else round(time.monotonic() - deadline, 3))
        self.ledger.seal(prefill.key, prefill.plan.content, prefill.done)
        self.ledger.release(prefill.key)
        if prefill.resumed is not None:
            self._finish(prefill.resumed)
        else:
            self._end_unstarted(job)

    def _new_sequences(self, prefill: Prefill, logits: torch.Tensor) -> list[Sequence]:
        """The request's n choices, from its prefilled prompt: the first keeps the prompt's
        blocks, each other one holds the same blocks (shared; the block it writes into is
        copied when it first writes, see `Scheduler.make_decode_room`)."""
        request = prefill.job.request
        choices = Choices(request.n)
        self._choices[request.request_id] = choices
        prompt, started = self.ledger.table(prefill.key), time.monotonic()
        for index in range(request.n):
            if index:
                self.ledger.adopt(choice_key(request.request_id, index),
                                  self.ledger.hold(prompt))
            choices.sequences.append(
                self._new_sequence(prefill, logits, index, choices, started))
        return choices.sequences

    def _new_sequence(self, prefill: Prefill, logits: torch.Tensor, index: int,
                      choices: Choices, started: float) -> Sequence:
        job, plan, info = prefill.job, prefill.plan, prefill.job.info
        text, streamer = open_stream(self.model.tokenizer, job, index)
        sampler = Sampler.create(job.request.sampling, prompt_length=len(plan.input_ids),
                                 eos_ids=self.model.eos_token_ids,
                                 seed=choice_seed(job.request, index),
                                 grammar=job.request.grammar)
        return Sequence(
            job=job, info=info, sampler=sampler, history=torch.tensor([plan.input_ids]),
            streamer=streamer, text=text, reuse=prefill.reuse if index == 0 else None,
            started=started, length=prefill.done,
            position_offset=prefill.inputs.position_offset, pending_logits=logits, index=index,
            choices=choices,
        )

    # ---- decoding ------------------------------------------------------------------------

    def _start(self, started: list[Sequence]) -> None:
        """Prefilled sequences sample their first tokens and run from now on."""
        if not started:
            return
        for sequence in started:
            self.scheduler.decoding[sequence.key] = sequence
        self._publish()  # a client that reads the account after its first token sees its KV
        choices = choose_tokens([s.sampler for s in started], [s.history for s in started],
                                torch.stack([s.pending_logits for s in started]))
        self._advance(started, choices)

    def _advance(self, running: list[Sequence], choices: list) -> None:
        """Hand each sequence its chosen token; a sequence that failed leaves alone."""
        for sequence, choice in zip(running, choices, strict=True):
            sequence.pending_logits = None
            if sequence.key not in self.scheduler.decoding:  # its request failed meanwhile
                continue
            try:
                if isinstance(choice, Exception):
                    raise choice
                done = self._accept(sequence, choice)
            except Exception as error:
                self._fail_sequence(sequence, error)
                continue
            if done:
                self._finish(sequence)

    def _accept(self, sequence: Sequence, token: int) -> bool:
        """Stream a chosen token; True when the sequence is done."""
        sequence.history = torch.cat([sequence.history, torch.tensor([[token]])], dim=1)
        sequence.next_token = token
        sequence.streamer.add_logprobs(sequence.sampler.take_logprobs())
        sequence.streamer.put(token)
        sequence.info.generated_tokens = sequence.choices.generated
        return stop_reason(sequence.job, sequence.streamer, self._eos) is not None

    def _decode_step(self, running: list[Sequence]) -> None:
        try:
            logits = self._with_one_retry(lambda: self._decode(running))
        except torch.OutOfMemoryError as error:
            # still out of memory after a trim: the newest sequence alone fails
            newest = max(running, key=lambda s: s.started)
            self._fail_sequence(newest, error)
            return
        except Exception as error:
            log.error("decode_step_failed", batch=len(running), error_type=type(error).__name__,
                      error=_brief(error), exc_info=error)
            for sequence in running:
                self._fail_sequence(sequence, error)
            return
        self.heartbeat = time.monotonic()
        self._decoded(running, logits)

    def _decoded(self, running: list[Sequence], logits: torch.Tensor) -> None:
        """Each sequence's token is in KV; it chooses the next from `logits`."""
        for sequence in running:
            sequence.length += 1
        choices = choose_tokens([s.sampler for s in running], [s.history for s in running],
                                logits)
        self._advance(running, choices)

    def _decode(self, running: list[Sequence]) -> torch.Tensor:
        """Feed every sequence its chosen token (a failed pass leaves lengths as they
        were: the next one writes the same slots again)."""
        tables = [self.ledger.table(s.key) for s in running]
        return self.model.decode_paged(self.ledger.pool, tables, [s.length for s in running],
                                       [s.next_token for s in running],
                                       [s.position_offset for s in running])

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

    # ---- finishing -----------------------------------------------------------------------

    def _finish(self, sequence: Sequence) -> None:
        """A choice ends (with n > 1 its end is streamed); the request ends with the last."""
        self.scheduler.decoding.pop(sequence.key, None)
        choices, request_id = sequence.choices, sequence.job.request.request_id
        if choices.over:  # its request failed: what is left of it is let go
            self._release(sequence.key)
            self._settle(request_id)
            return
        try:
            sequence.streamer.end()
            reason = end_reason(sequence.job, sequence.streamer, self._eos)
            if reason is FinishReason.CANCELLED:
                self._release(sequence.key)
            else:
                self._keep(sequence)
        except Exception as error:
            self._fail_sequence(sequence, error)
            return
        end = choice_end(sequence.index, sequence.streamer, sequence.text, reason)
        choices.ends[sequence.index] = end
        if choices.n > 1:
            sequence.job.handle.push(end)
        if len(choices.ends) < choices.n:
            self._settle(request_id)
            return
        self._choices.pop(request_id, None)
        finished = self._request_final(sequence.job, choices)
        choices.sequences.clear()  # no cycle keeps the ended request (and its media) alive
        # retire and publish first: a client that reads the account after its final
        # message must see its KV where it went (an idle cache), not still running
        self.requests.retire(request_id)
        self._publish()
        sequence.job.handle.push(finished)

    def _request_final(self, job: Job, choices: Choices) -> Finished:
        first = choices.sequences[0]
        cached = first.reuse.tokens if first.reuse else 0
        if choices.n == 1:
            finished = final_event(job, first.streamer, first.text, choices.ends[0].reason,
                                   cached)
        else:
            finished = choices_final(job, list(choices.ends.values()), cached)
        self._log_finished(job, finished, first.reuse, first.started)
        return finished

    def _settle(self, request_id: str) -> None:
        """A request none of whose choices is in the batch (the rest wait, preempted)
        leaves the running set, so that admission can let them back in."""
        if any(s.job.request.request_id == request_id for s in self.scheduler.decoding.values()):
            return
        if any(p.job.request.request_id == request_id for p in self.scheduler.prefilling):
            return
        self.requests.leave(request_id)

    def _keep(self, sequence: Sequence) -> None:
        """A finished sequence's blocks go to its session (choice 0's), or stay cached by
        content."""
        key = sequence.key
        if sequence.swapped:
            self.ledger.release(key)
            return
        if not self.ledger.all_finite(key, sequence.length):  # never hand on poisoned KV
            raise NonFiniteScores()
        session = sequence.job.request.session_id if sequence.index == 0 else ""
        self.sessions.put(session, key, sequence.content, sequence.length)

    @staticmethod
    def _log_finished(job: Job, finished: Finished, reuse: Reuse | None,
                      started: float) -> None:
        extra = {"choices": job.request.n} if job.request.n > 1 else {}
        log.info("generation_finished", request_id=job.request.request_id,
                 finish_reason=finished.reason.value,
                 prompt_tokens=finished.usage.prompt_tokens,
                 completion_tokens=finished.usage.completion_tokens,
                 cached_prompt_tokens=finished.usage.cached_prompt_tokens,
                 reuse=reuse.source if reuse else None,
                 seconds=round(time.monotonic() - started, 4), **extra)

    def _fail_sequence(self, sequence: Sequence, error: BaseException) -> None:
        """A choice failed: it leaves the batch and its request fails (once)."""
        self.scheduler.decoding.pop(sequence.key, None)
        self._release(sequence.key)
        if not sequence.choices.over:
            self._fail(sequence.job, sequence.info, error)

    def _fail(self, job: Job, info: RunningInfo | None, error: BaseException) -> None:
        request_id = job.request.request_id
        choices = self._choices.pop(request_id, None)
        if choices is not None:  # its other choices stop; queued ones end when dequeued
            choices.over = True
            for sequence in choices.sequences:
                self.scheduler.decoding.pop(sequence.key, None)
                self._release(sequence.key)
            choices.sequences.clear()  # no cycle keeps the failed request alive
            for prefill in [p for p in self.scheduler.prefilling if p.job.request.request_id
                            == request_id]:
                self.scheduler.prefilling.remove(prefill)
                self._release(prefill.key)
            if choices.n > 1:
                job.handle.cancel()
        self._release(request_id)
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
        if info is not None or choices is not None:
            self.requests.retire(request_id)
        self._publish()
        job.handle.push(Failed(error))

    # ---- KV reuse ------------------------------------------------------------------------

    def kv_estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV a request holds at its longest: prompt plus every token it may generate."""
        return self.ledger.blocks_for(prompt_tokens + max_new_tokens) * self.ledger.bytes_per_block

def _brief(error: BaseException) -> str:
    """An exception for the log: its message, cut short (never request content)."""
    return clip(str(error), 300)


