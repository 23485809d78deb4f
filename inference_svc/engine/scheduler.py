"""The scheduler: plans each step and settles it. It alone touches the waiting queue,
the batch and the KV ledger.

`schedule()` admits what fits of the waiting jobs (engine/kv_room.py takes their KV
blocks, evicting and preempting when they run out), stops what was cancelled, gives
each decoding sequence the block its next token goes to, and picks the prompt chunks
that share the step (sequences.py), returning a `StepPlan` (engine/step.py).
`update(plan, out)` settles what the runner did: prompts advance, completed ones start
their choices, every row takes its token and is streamed, and what ended ends
(engine/endings.py). What clients are to hear goes to the outbox.
"""

from __future__ import annotations

import time

import structlog
import torch

from inference_svc.engine.config import EngineConfig
from inference_svc.engine.endings import Endings
from inference_svc.engine.jobs import Failed, Outbox
from inference_svc.engine.kv_blocks import BlockLedger
from inference_svc.engine.kv_room import KVRoom
from inference_svc.engine.output import choice_seed, open_stream, stop_reason
from inference_svc.engine.request_queue import RequestQueue
from inference_svc.engine.sampling import Choice, Sampler
from inference_svc.engine.sequences import (
    Batch,
    Choices,
    Job,
    Prefill,
    Sequence,
    choice_key,
    pick_prefill_work,
    resume_plan,
)
from inference_svc.engine.sessions import SessionStore
from inference_svc.engine.step import PromptChunk, StepOutput, StepPlan
from inference_svc.errors import ResourceExhausted
from inference_svc.model.paged.kv_pool import RowSlots

log = structlog.get_logger("engine")


class Scheduler:
    def __init__(self, config: EngineConfig, ledger: BlockLedger, sessions: SessionStore, *,
                 tokenizer, eos_ids: list[int], chunk_tokens: int, observer=None) -> None:
        self.config = config
        self.ledger = ledger
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.chunk_tokens = chunk_tokens
        self.observer = observer  # told of admissions and preemptions (metrics)
        self.requests = RequestQueue(max_queued=config.max_queued, max_batch=config.max_batch)
        self.batch = Batch()
        self.outbox = Outbox()
        self.endings = Endings(ledger, sessions, self.requests, self.batch, self.outbox,
                               frozenset(eos_ids))
        self.room = KVRoom(ledger, sessions, self.requests, self.batch, self.endings,
                           chunk_tokens=chunk_tokens, prefix_caching=config.prefix_caching,
                           observer=observer)
        self._long_passed_over = False  # the last step left a long prompt out

    @property
    def idle(self) -> bool:
        return not (self.batch.decoding or self.batch.prefilling)

    # ---- planning ------------------------------------------------------------------

    def schedule(self) -> StepPlan | None:
        """The next step's plan (empty when nothing runs); None once told to stop, when
        every request has been ended, cancelled."""
        admitted = self._admit_waiting()
        if admitted is None:
            self.endings.cancel_everything()
            return None
        for job in admitted:
            self._start(job)
        self._stop_cancelled()
        if self.batch.decoding:
            self.room.make_decode_room()
        self._grow_live()
        return self._plan()

    def _plan(self) -> StepPlan:
        ledger, rows = self.ledger, list(self.batch.decoding.values())
        chunks = [PromptChunk(p, end, RowSlots(ledger.slots(p.key, p.done, end),
                                               ledger.slots(p.key, 0, end)))
                  for p, end in self._prefill_work(decode_rows=len(rows))]
        row_slots = []
        if chunks and self.config.mixed_steps:
            row_slots = [RowSlots(ledger.slots(s.key, s.length, s.length + 1),
                                  ledger.slots(s.key, 0, s.length + 1)) for s in rows]
        return StepPlan(chunks, rows, [ledger.table(s.key) for s in rows], row_slots)

    def _prefill_work(self, *, decode_rows: int) -> list[tuple[Prefill, int]]:
        """The prompts this step takes, and how far (sequences.py): one chunk of positions
        less the decode rows that share the step, never under half a chunk."""
        if not self.batch.prefilling:
            return []
        budget = max(self.chunk_tokens - decode_rows, self.chunk_tokens // 2, 1)
        work, self._long_passed_over = pick_prefill_work(
            self.batch.prefilling, budget, long_passed_over=self._long_passed_over)
        return work

    def _grow_live(self) -> None:
        """Live prompts take in what has come of their speech, blocks first (a prompt
        with no room yet grows when room comes); a sealed one is complete and gets its
        samplers and history."""
        ledger = self.ledger
        for prefill in [p for p in self.batch.prefilling if p.job.live and p.plan.open]:
            plan = prefill.job.live.plan()
            if len(plan.input_ids) == len(prefill.plan.input_ids) and plan.open:
                continue
            need = ledger.blocks_for(len(plan.input_ids)) - len(ledger.table(prefill.key))
            if not self.room.make_room(need, prefill.job.request.priority):
                continue
            ledger.extend(prefill.key, len(plan.input_ids))
            job = prefill.job
            prefill.plan = job.plan = plan
            if not plan.open:
                job.max_new_tokens = min(job.max_new_tokens,
                                         job.live.context - len(plan.input_ids))
                prefill.history = torch.tensor([plan.input_ids])
                prefill.samplers = self._samplers(job)

    def _stop_cancelled(self) -> None:
        for prefill in [p for p in self.batch.prefilling if p.job.handle.cancellation.requested]:
            self.endings.stop_prefill(prefill, self.chunk_tokens)
        for sequence in [s for s in self.batch.decoding.values()
                         if s.job.handle.cancellation.requested]:
            self.endings.finish(sequence)

    # ---- admission -----------------------------------------------------------------

    def _admit_waiting(self) -> list[Job] | None:
        """Every waiting job that fits joins this step, in queue order, up to the first
        that does not; None when the stop marker came."""
        admitted: list[Job] = []
        while (job := self._next_job()) is not None:
            if job.request is None:
                return None
            if not self.room.admit(job):
                self._wait_for_room(job)
                break
            if self.requests.register(job) and job.resume is None and self.observer:
                self.observer.request_admitted(time.monotonic() - job.enqueued_at)
            admitted.append(job)
        return admitted

    def _next_job(self) -> Job | None:
        """The next job admission may take: None when none waits, or when as many run as
        the admission mode allows. A job cancelled while it waited ends here."""
        requests = self.requests
        while True:
            if requests.admission.mode == "paused" and not requests.stopping:
                self._expire_queued()
            if requests.full:
                return None
            job = requests.get(block=False)
            if job is None:
                return None
            if job.wake:
                continue
            if job.request is None:  # the stop marker
                return job
            if job.handle.cancellation.requested:
                self.endings.end_unstarted(job)
                continue
            return job

    def _expire_queued(self) -> None:
        """While admission is paused, fresh requests past the queue timeout fail."""
        for job in self.requests.drain():
            if job.request is not None and self.requests.waited_too_long(
                    job, self.config.queue_timeout_s):
                self.outbox.post(job.handle, Failed(ResourceExhausted(
                    "admission is paused under memory pressure; retry later",
                    resource="admission", retry_after_s=2.0)))
            elif not job.wake:
                self.requests.back(job)

    def _wait_for_room(self, job: Job) -> None:
        """Not enough KV yet: wait in the queue, up to the queue timeout (a preempted
        job waits as long as it takes: it was admitted once and is never dropped)."""
        if self.requests.waited_too_long(job, self.config.queue_timeout_s):
            self.outbox.post(job.handle, Failed(ResourceExhausted(
                "KV cache budget is fully used by running requests; retry later",
                resource="kv_cache", retry_after_s=1.0)))
            return
        if not job.waiting:  # once per job: what admission saw when it first said no
            job.waiting = True
            account = self.ledger.account()
            log.info("admission_waiting", request_id=job.request.request_id,
                     prompt_tokens=len(job.plan.input_ids), held_bytes=account.held_bytes,
                     cached_bytes=account.cached_bytes, budget_bytes=account.budget_bytes,
                     running=len(self.requests.running))
        self.requests.back(job)

    def _start(self, job: Job) -> None:
        """An admitted job runs: its prompt queues for chunked prefill, or its swapped
        sequence rejoins the batch. One cancelled while it waited does not start."""
        resume, cached = job.resume, job.reuse.tokens if job.reuse else 0
        if job.handle.cancellation.requested:
            if resume is not None:
                self.endings.finish(resume)
            else:
                self.endings.end_unstarted(job)
        elif resume is not None and resume.swapped:
            resume.info, resume.swapped = job.info, False
            self.batch.decoding[resume.key] = resume
            log.info("resumed", request_id=job.request.request_id, choice=resume.index,
                     swapped_in_tokens=resume.length)
        elif resume is not None:
            resume.info = job.info
            self.batch.prefilling.append(Prefill(job, resume_plan(resume), cached, cached,
                                                 job.reuse, resume))
        else:
            self.batch.prefilling.append(Prefill(
                job, job.plan, cached, cached, job.reuse, samplers=self._samplers(job),
                history=torch.tensor([job.plan.input_ids])))

    def _samplers(self, job: Job) -> list[Sampler]:
        """One per choice, each with its own seed (engine/output.py `choice_seed`)."""
        request = job.request
        return [Sampler.create(request.sampling, prompt_length=len(job.plan.input_ids),
                               eos_ids=self.eos_ids, seed=choice_seed(request, index),
                               grammar=request.grammar) for index in range(request.n)]

    # ---- settling ------------------------------------------------------------------

    def update(self, plan: StepPlan, out: StepOutput) -> None:
        """Settle a step the runner ran: prompts advance (completed ones start their
        choices with the first tokens chosen), rows take their tokens, what ended ends."""
        for chunk, outcome in zip(plan.chunks, out.prompts, strict=True):
            prefill = chunk.prefill
            if outcome.error is not None:
                self.endings.fail(prefill.job, prefill.job.info, outcome.error)
            elif prefill in self.batch.prefilling:
                prefill.done = chunk.end
                if prefill.complete:
                    self._prefilled(prefill, outcome.first_tokens)
        self._advance(plan.rows, out.tokens, fed=True)

    def _prefilled(self, prefill: Prefill, first_tokens: list[Choice]) -> None:
        self.batch.prefilling.remove(prefill)
        self.ledger.seal(prefill.key, prefill.plan.content, prefill.done)
        sequence = prefill.resumed
        if sequence is not None:
            sequence.length = prefill.done
            self.batch.decoding[sequence.key] = sequence
            log.info("resumed", request_id=prefill.job.request.request_id,
                     choice=sequence.index, recomputed_tokens=prefill.done)
            return
        started = self._new_sequences(prefill)
        for sequence in started:
            self.batch.decoding[sequence.key] = sequence
        self._advance(started, first_tokens, fed=False)

    def _new_sequences(self, prefill: Prefill) -> list[Sequence]:
        """The request's n choices, from its prefilled prompt: the first keeps the prompt's
        blocks, each other one holds the same blocks (shared; the block it writes into is
        copied when it first writes, see `KVRoom.make_decode_room`)."""
        job = prefill.job
        request_id = job.request.request_id
        choices = Choices(job.request.n)
        self.batch.choices[request_id] = choices
        prompt, started = self.ledger.table(prefill.key), time.monotonic()
        for index, sampler in enumerate(prefill.samplers):
            if index:
                self.ledger.adopt(choice_key(request_id, index), self.ledger.hold(prompt))
            text, streamer = open_stream(self.tokenizer, job, index, self._emitter(job))
            choices.sequences.append(Sequence(
                job=job, info=job.info, sampler=sampler, history=prefill.history,
                streamer=streamer, text=text, reuse=prefill.reuse if index == 0 else None,
                started=started, length=prefill.done,
                position_offset=prefill.inputs.position_offset, index=index,
                choices=choices))
        return choices.sequences

    def _emitter(self, job: Job):
        """Where a choice's text deltas go: the outbox, for the job's handle (a bound
        method of the handle would not wait for the account; a closure over the
        streamer would keep the job alive in a cycle)."""
        handle, post = job.handle, self.outbox.post
        return lambda delta: post(handle, delta)

    def _advance(self, sequences: list[Sequence], tokens: list[Choice | None], *,
                 fed: bool) -> None:
        """Hand each sequence its chosen token (`fed`: the token before it is now in
        KV); a sequence that failed leaves alone, one that is done ends."""
        for sequence, token in zip(sequences, tokens, strict=True):
            if token is None or sequence.key not in self.batch.decoding:
                continue  # did not run this step, or its request failed meanwhile
            try:
                if isinstance(token, Exception):
                    raise token
                if fed:
                    sequence.length += 1
                done = self._accept(sequence, token)
            except Exception as error:
                self.endings.fail_sequence(sequence, error)
                continue
            if done:
                self.endings.finish(sequence)

    def _accept(self, sequence: Sequence, token: int) -> bool:
        """Stream a chosen token; True when the sequence is done."""
        sequence.history = torch.cat([sequence.history, torch.tensor([[token]])], dim=1)
        sequence.next_token = token
        sequence.streamer.add_logprobs(sequence.sampler.take_logprobs())
        sequence.streamer.put(token)
        sequence.info.generated_tokens = sequence.choices.generated
        return stop_reason(sequence.job, sequence.streamer, self.endings.eos_ids) is not None
