"""Room in the KV budget: what admission and decoding take, and what is given up for it.

Admission takes a job's prompt blocks (less what is already computed, by session or by
content) when they fit beside a small watermark; decoding takes a block when a sequence
fills its last one. When blocks run out, idle sessions are evicted (least recently
used), then running work is preempted: for an admission only work of lower priority,
for decoding the lowest-priority, newest sequence. A preempted sequence is swapped to
host memory when long (copying is cheaper than recomputing) or let go and recomputed
when short, and goes back to the waiting queue ahead of fresh jobs of its priority.
"""

from __future__ import annotations

import structlog

from inference_svc.engine.endings import Endings
from inference_svc.engine.kv_blocks import BlockLedger, KVExhausted
from inference_svc.engine.request_queue import RequestQueue
from inference_svc.engine.sequences import Batch, Job, Prefill, Sequence, resume_plan, victim_order
from inference_svc.engine.sessions import Reuse, SessionStore
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.types import GenerationRequest

log = structlog.get_logger("engine")
# Share of the KV budget kept free at admission for the running rows to grow into.
ADMISSION_WATERMARK = 0.01


class KVRoom:
    def __init__(self, ledger: BlockLedger, sessions: SessionStore, requests: RequestQueue,
                 batch: Batch, endings: Endings, *, chunk_tokens: int, prefix_caching: bool,
                 observer=None) -> None:
        self.ledger = ledger
        self.sessions = sessions
        self.requests = requests
        self.batch = batch
        self.endings = endings
        self.chunk_tokens = chunk_tokens  # a preempted sequence longer than this is swapped
        self.prefix_caching = prefix_caching
        self.observer = observer  # told of each preemption (metrics)
        self.swaps = 0

    # ---- admission -----------------------------------------------------------------

    def admit(self, job: Job) -> bool:
        """Take the job's blocks if they fit beside a watermark for the running rows to
        grow into, after evicting idle sessions or, for a higher-priority job,
        preempting lower-priority sequences; False (nothing taken) when they do not.

        The blocks are its prompt's, less those already computed that it finds (a
        session's, or cached by content), or a swapped sequence's, to come back. What it
        finds becomes its own as it is found, so admission is one act, not a pure check
        and then an act."""
        ledger, resume = self.ledger, job.resume
        swapped = resume is not None and resume.swapped
        key = resume.key if resume is not None else job.request.request_id
        if swapped:
            need = ledger.blocks_for(resume.length + 1)
        else:
            plan = resume_plan(resume) if resume is not None else job.plan
            job.reuse = self._reuse(job.request, plan, key)
            held = len(ledger.tables.get(key, []))
            need = ledger.blocks_for(len(plan.input_ids)) - held
            if resume is None:  # each further choice soon writes a block of its own
                need += job.request.n - 1
        watermark = int(ADMISSION_WATERMARK * ledger.budget_blocks)
        try:
            if not self.make_room(need + watermark, job.request.priority):
                raise KVExhausted()
            if swapped:
                ledger.swap_in(key)
            else:
                ledger.extend(key, len(plan.input_ids))
        except KVExhausted:  # not yet: what it found is let go (still cached), it waits
            if not swapped:
                ledger.release(key)
            job.reuse = None
            return False
        return True

    def make_room(self, blocks: int, priority: int) -> bool:
        """Whether `blocks` can be had: evict idle sessions (least recently used), then
        preempt running sequences of lower priority (newest first)."""
        ledger = self.ledger
        while not ledger.can_take(blocks):
            short = (blocks - ledger.available()) * ledger.bytes_per_block
            if self.sessions.evict_lru(short).sessions:
                continue
            victims = [s for s in self.batch.decoding.values()
                       if s.job.request.priority < priority]
            if not victims:
                return False
            self.preempt(min(victims, key=victim_order), reason="priority")
        return True

    def _reuse(self, request: GenerationRequest, plan: PromptPlan, owner: str) -> Reuse | None:
        if not (request.session_id or self.prefix_caching):
            return None
        return self.sessions.take(request.session_id, plan.content, owner)

    # ---- decoding ------------------------------------------------------------------

    def make_decode_room(self) -> None:
        """Each decoding sequence gets the block its next token goes to; when none is
        left, idle sessions are evicted, then the lowest-priority, newest sequence is
        preempted (it may be the one asking)."""
        ledger, decoding = self.ledger, self.batch.decoding
        for sequence in sorted(decoding.values(), key=victim_order, reverse=True):
            while sequence.key in decoding:
                try:
                    ledger.extend(sequence.key, sequence.length + 1)
                    # copy on write: a block shared with other choices is copied first
                    ledger.writable_from(sequence.key, sequence.length)
                    break
                except KVExhausted:
                    if self.sessions.evict_lru(ledger.bytes_per_block).sessions:
                        continue
                    victim = min(decoding.values(), key=victim_order)
                    if victim is sequence and len(decoding) == 1 and self.batch.prefilling:
                        self.requeue_prefill(self.batch.prefilling[-1])
                        continue
                    self.preempt(victim, reason="kv_budget")

    # ---- preemption ----------------------------------------------------------------

    def preempt(self, sequence: Sequence, *, reason: str) -> None:
        """Take a decoding sequence out and re-queue it. A long one's blocks are copied to
        host memory; a short one's are let go (kept cached by content, so its
        recomputation may find them) and recomputed."""
        key = sequence.key
        self.batch.decoding.pop(key, None)
        self._preempted(sequence.job, reason)
        if sequence.length > self.chunk_tokens:
            ledger_bytes = self.ledger.swap_out(key)
            sequence.swapped = True
            self.swaps += 1
        else:
            ledger_bytes = 0
            self.ledger.seal(key, sequence.content, sequence.length)
            self.ledger.release(key)
            sequence.swapped = False
        job = sequence.job
        log.info("preempted", request_id=job.request.request_id, choice=sequence.index,
                 priority=job.request.priority, generated_tokens=sequence.generated, reason=reason,
                 swapped_bytes=ledger_bytes, recompute=not sequence.swapped)
        self.requests.requeue_preempted(job.again(resume=sequence))

    def requeue_prefill(self, prefill: Prefill) -> None:
        """A prompt not yet prefilled gives its blocks back and waits again."""
        self.batch.prefilling.remove(prefill)
        self.ledger.seal(prefill.key, prefill.plan.content, prefill.done)
        self.ledger.release(prefill.key)
        job = prefill.job
        self._preempted(job, "kv_budget")
        log.info("preempted", request_id=job.request.request_id, priority=job.request.priority,
                 generated_tokens=0, reason="kv_budget", recompute=True)
        self.requests.requeue_preempted(job.again(resume=prefill.resumed))

    def _preempted(self, job: Job, reason: str) -> None:
        self.endings.settle(job.request.request_id)
        self.requests.preemptions += 1
        if self.observer is not None:
            self.observer.request_preempted(reason)
