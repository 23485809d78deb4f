"""How requests end on the model thread: finished, failed, cancelled or never started.

Each ending lets go of the request's KV blocks (or hands them to its session, or keeps
them cached by content), settles the request queue's bookkeeping and posts the final
event to the outbox, which the model loop delivers once the KV account is published: a
client that reads the account after its final message sees its KV where it went.
"""

from __future__ import annotations

import time

import structlog
import torch

from inference_svc.engine.jobs import Failed, Outbox, RunningInfo
from inference_svc.engine.kv_blocks import BlockLedger
from inference_svc.engine.output import choice_end, choices_final, end_reason, final_event, usage
from inference_svc.engine.request_queue import RequestQueue
from inference_svc.engine.sampling import NonFiniteScores
from inference_svc.engine.sequences import Batch, Choices, Job, Prefill, Sequence
from inference_svc.engine.sessions import Reuse, SessionStore
from inference_svc.errors import GenerationFailed, ResourceExhausted, ServiceError, brief
from inference_svc.types import Finished, FinishReason

log = structlog.get_logger("engine")


class Endings:
    def __init__(self, ledger: BlockLedger, sessions: SessionStore, requests: RequestQueue,
                 batch: Batch, outbox: Outbox, eos_ids: frozenset[int]) -> None:
        self.ledger = ledger
        self.sessions = sessions
        self.requests = requests
        self.batch = batch
        self.outbox = outbox
        self.eos_ids = eos_ids

    # ---- finishing ---------------------------------------------------------------------

    def finish(self, sequence: Sequence) -> None:
        """A choice ends (with n > 1 its end is streamed); the request ends with the last."""
        self.batch.decoding.pop(sequence.key, None)
        choices, request_id = sequence.choices, sequence.job.request.request_id
        if choices.over:  # its request failed: what is left of it is let go
            self.release(sequence.key)
            self.settle(request_id)
            return
        try:
            sequence.streamer.end()
            reason = end_reason(sequence.job, sequence.streamer, self.eos_ids)
            if reason is FinishReason.CANCELLED:
                self.release(sequence.key)
            else:
                self._keep(sequence)
        except Exception as error:
            self.fail_sequence(sequence, error)
            return
        end = choice_end(sequence.index, sequence.streamer, sequence.text, reason)
        choices.ends[sequence.index] = end
        if choices.n > 1:
            self.outbox.post(sequence.job.handle, end)
        if len(choices.ends) < choices.n:
            self.settle(request_id)
            return
        self.batch.choices.pop(request_id, None)
        finished = self._request_final(sequence.job, choices)
        choices.sequences.clear()  # no cycle keeps the ended request (and its media) alive
        self.requests.retire(request_id)
        self.outbox.post(sequence.job.handle, finished)

    def _request_final(self, job: Job, choices: Choices) -> Finished:
        first = choices.sequences[0]
        cached = first.reuse.tokens if first.reuse else 0
        if choices.n == 1:
            finished = final_event(job, first.streamer, first.text, choices.ends[0].reason,
                                   cached)
        else:
            finished = choices_final(job, list(choices.ends.values()), cached)
        _log_finished(job, finished, first.reuse, first.started)
        return finished

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

    def settle(self, request_id: str) -> None:
        """A request none of whose choices is in the batch (the rest wait, preempted)
        leaves the running set, so that admission can let them back in."""
        if not self.batch.holds(request_id):
            self.requests.leave(request_id)

    def release(self, key: str) -> None:
        self.ledger.release(key, keep_cached=False)

    # ---- stopping before the end -------------------------------------------------------

    def stop_prefill(self, prefill: Prefill, chunk_tokens: int) -> None:
        """Cancelled or past its deadline mid-prefill: the work stops; the blocks already
        computed that another prompt may find stay cached by content."""
        self.batch.prefilling.remove(prefill)
        deadline = prefill.job.request.deadline
        log.info("prefill_stopped", request_id=prefill.key,
                 prompt_tokens=len(prefill.plan.input_ids),
                 computed_tokens=prefill.done - prefill.cached, chunk_tokens=chunk_tokens,
                 past_deadline_s=None if deadline is None
                 else round(time.monotonic() - deadline, 3))
        self.ledger.seal(prefill.key, prefill.plan.content, prefill.reusable)
        self.ledger.release(prefill.key)
        if prefill.resumed is not None:
            self.finish(prefill.resumed)
        else:
            self.end_unstarted(prefill.job)

    def end_unstarted(self, job: Job) -> None:
        """A job cancelled before it ran (or a preempted choice before it ran again)."""
        job.handle.cancel()
        if job.resume is not None:  # a preempted choice: it ends, cancelled
            self.finish(job.resume)
            return
        self.release(job.request.request_id)
        if job.info is not None:
            self.requests.retire(job.request.request_id)
        else:
            self.requests.ended_unadmitted()
        self.outbox.post(job.handle, Finished(FinishReason.CANCELLED, usage(job, 0)))

    def cancel_everything(self) -> None:
        """Shutdown: every running and waiting request ends with CANCELLED and its usage."""
        batch = self.batch
        for sequence in list(batch.decoding.values()):
            sequence.job.handle.cancel()
            self.finish(sequence)
        for prefill in [p for p in batch.prefilling if p.resumed is not None]:
            batch.prefilling.remove(prefill)
            prefill.job.handle.cancel()
            self.finish(prefill.resumed)
        batch.prefilling.clear()
        for job in self.requests.admitted():  # admitted but not started
            self.end_unstarted(job)
        for job in self.requests.drain():
            if job.request is not None:
                self.end_unstarted(job)

    # ---- failing -----------------------------------------------------------------------

    def fail_sequence(self, sequence: Sequence, error: BaseException) -> None:
        """A choice failed: it leaves the batch and its request fails (once)."""
        self.batch.decoding.pop(sequence.key, None)
        self.release(sequence.key)
        if not sequence.choices.over:
            self.fail(sequence.job, sequence.info, error)

    def fail(self, job: Job, info: RunningInfo | None, error: BaseException) -> None:
        request_id = job.request.request_id
        choices = self.batch.choices.pop(request_id, None)
        if choices is not None:  # its other choices stop; queued ones end when dequeued
            choices.over = True
            for sequence in choices.sequences:
                self.batch.decoding.pop(sequence.key, None)
                self.release(sequence.key)
            choices.sequences.clear()  # no cycle keeps the failed request alive
            if choices.n > 1:
                job.handle.cancel()
        for prefill in self.batch.prefills_of(request_id):
            self.batch.prefilling.remove(prefill)
            self.release(prefill.key)
        self.release(request_id)
        error = _reported(job, error)
        if info is not None or choices is not None:
            self.requests.retire(request_id)
        self.outbox.post(job.handle, Failed(error))

    def fail_in_flight(self, error: Exception) -> None:
        """An error outside any one request's work: every request in flight fails (their
        shared state cannot be trusted)."""
        log.error("model_loop_error", error_type=type(error).__name__, error=brief(error),
                  in_flight=len(self.requests.admitted()), exc_info=error)
        self.batch.decoding.clear()
        self.batch.prefilling.clear()
        failure = GenerationFailed("internal error in the model loop; retry the request")
        for job in self.requests.admitted():
            self.fail(job, job.info, failure)


def _reported(job: Job, error: BaseException) -> BaseException:
    """The error as the client hears it, logged once."""
    request_id = job.request.request_id
    if isinstance(error, torch.OutOfMemoryError):
        log.warning("out_of_memory", request_id=request_id)
        return ResourceExhausted("out of memory while generating; retry later",
                                 resource="memory", retry_after_s=2.0)
    if isinstance(error, ServiceError):
        log.warning("generation_failed", request_id=request_id, reason=error.reason,
                    error=brief(error))
    else:
        log.error("generation_failed", request_id=request_id,
                  error_type=type(error).__name__, error=brief(error), exc_info=error)
    return error


def _log_finished(job: Job, finished: Finished, reuse: Reuse | None, started: float) -> None:
    extra = {"choices": job.request.n} if job.request.n > 1 else {}
    log.info("generation_finished", request_id=job.request.request_id,
             finish_reason=finished.reason.value,
             prompt_tokens=finished.usage.prompt_tokens,
             completion_tokens=finished.usage.completion_tokens,
             cached_prompt_tokens=finished.usage.cached_prompt_tokens,
             reuse=reuse.source if reuse else None,
             seconds=round(time.monotonic() - started, 4), **extra)
