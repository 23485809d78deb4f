"""The requests between the asyncio side and the model loop: those waiting for admission
and the bookkeeping other threads read (what runs, how many wait, how many finished,
the admission mode). Thread-safe; the scheduler takes jobs from it, the engine puts
them in and reads the counts.

Waiting is a priority queue: higher priority first, then arrival; a preempted job goes
back ahead of fresh jobs of its priority (it was admitted before them). Two kinds of
entry carry no request: the stop marker (ends the loop) and a wake-up (control work
waits for the loop).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time

import structlog

from inference_svc.engine.jobs import Admission, RunningInfo
from inference_svc.engine.sequences import Job
from inference_svc.errors import NotReady, ResourceExhausted

log = structlog.get_logger("engine")
STOP_FIRST = -(2**62)  # queue position of the stop marker: before everything
WAKE = -(2**62) + 1  # queue position of a wake-up for control tasks
RESUME_FIRST = -(2**61)  # queue position of preempted jobs: before every fresh one


class RequestQueue:
    def __init__(self, *, max_queued: int, max_batch: int) -> None:
        self.max_queued = max_queued
        self.max_batch = max_batch
        self.lock = threading.Lock()
        self.running: dict[str, RunningInfo] = {}
        self.queued = 0
        self.completed = 0
        self.preemptions = 0
        self.stopping = False
        self.admission = Admission()
        self.admission_changed = threading.Condition()
        self._jobs: dict[str, Job] = {}  # admitted and not yet retired, by request id
        self._queue: queue.PriorityQueue[Job] = queue.PriorityQueue()
        self._order = itertools.count()

    # ---- from other threads ----------------------------------------------------------

    def put(self, job: Job) -> None:
        """A new request waits for admission; refused when the service is stopping or
        the queue is full."""
        with self.lock:
            if self.stopping:
                raise NotReady("the service is shutting down")
            if self.queued >= self.max_queued:
                raise ResourceExhausted(f"request queue is full ({self.max_queued} waiting)",
                                        resource="queue", retry_after_s=1.0)
            self.queued += 1
            job.sort_key = (-job.request.priority, next(self._order))
            self._queue.put(job)

    def stop(self) -> None:
        """No request is queued behind the stop marker (it would never be answered)."""
        with self.lock:
            self.stopping = True
            self._queue.put(Job((STOP_FIRST, -1), None))
        self.notify()

    def wake(self) -> None:
        self._queue.put(Job((WAKE, next(self._order)), None, wake=True))
        self.notify()

    def set_admission(self, admission: Admission) -> None:
        with self.admission_changed:
            self.admission = admission
            self.admission_changed.notify_all()

    def notify(self) -> None:
        with self.admission_changed:
            self.admission_changed.notify_all()

    @property
    def busy(self) -> bool:
        """Work is waiting or running."""
        with self.lock:
            return bool(self.queued or self.running)

    # ---- the scheduler's side ----------------------------------------------------------

    def capacity(self) -> int:
        """How many requests may run now, by the admission mode (a lapsed lease reopens)."""
        admission = self.admission
        if admission.mode != "open" and admission.lapsed:
            log.warning("admission_lease_lapsed", mode=admission.mode)
            self.set_admission(Admission())
            admission = self.admission
        if admission.mode == "paused":
            return 0
        if admission.mode == "limited":
            return min(admission.max_running, self.max_batch)
        return self.max_batch

    @property
    def full(self) -> bool:
        return len(self.running) >= self.capacity() and not self.stopping

    def wait_for_capacity(self, timeout: float) -> None:
        with self.admission_changed:
            self.admission_changed.wait(timeout=timeout)

    def get(self, *, block: bool) -> Job | None:
        """The next entry, None when none came (at once, or within a second when
        blocking). A request taken stops counting as queued."""
        try:
            job = self._queue.get(timeout=1.0) if block else self._queue.get_nowait()
        except queue.Empty:
            return None
        if job.request is not None:
            with self.lock:
                self.queued -= 1
        return job

    def wait_for_work(self, timeout: float) -> bool:
        """Block until an entry waits (it stays queued; a wake-up is taken) or, while
        no more requests may run, until admission changes; False when `timeout` passed
        with neither."""
        if self.full:
            with self.admission_changed:
                return self.admission_changed.wait(timeout=min(timeout, 0.2))
        try:
            job = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if not job.wake:
            self._queue.put(job)
        return True

    def back(self, job: Job) -> None:
        """A taken entry waits again where it was (admission said not yet)."""
        if job.request is not None:
            with self.lock:
                self.queued += 1
        self._queue.put(job)

    def requeue_preempted(self, job: Job) -> None:
        """A preempted job waits again, ahead of fresh jobs of its priority."""
        job.sort_key = (-job.request.priority, RESUME_FIRST + next(self._order))
        self.back(job)

    def drain(self) -> list[Job]:
        """Everything queued, taken out (requests stop counting as queued)."""
        taken = []
        while (job := self.get(block=False)) is not None:
            taken.append(job)
        return taken

    # ---- what runs -------------------------------------------------------------------

    def register(self, job: Job) -> bool:
        """The admitted job's request runs; False when it already did (another of its
        choices is in the batch, and the job takes that request's info)."""
        request = job.request
        with self.lock:
            known = self.running.get(request.request_id)
            if job.resume is not None and known is not None:
                job.info = known
                return False
            info = RunningInfo(request.request_id, request.session_id, request.modalities,
                               len(job.plan.input_ids), priority=request.priority)
            if job.resume is not None:
                info.generated_tokens = job.resume.choices.generated
            job.info = info
            self.running[info.request_id] = info
            self._jobs[info.request_id] = job
        return True

    def admitted(self) -> list[Job]:
        with self.lock:
            return list(self._jobs.values())

    def leave(self, request_id: str) -> None:
        """A request none of whose choices is in the batch stops counting as running."""
        with self.lock:
            self.running.pop(request_id, None)
            self._jobs.pop(request_id, None)

    def retire(self, request_id: str) -> None:
        """A request ended."""
        with self.lock:
            self.running.pop(request_id, None)
            self._jobs.pop(request_id, None)
            self.completed += 1
        self.notify()

    def ended_unadmitted(self) -> None:
        """A request ended before it was admitted."""
        with self.lock:
            self.completed += 1

    def waited_too_long(self, job: Job, timeout_s: float) -> bool:
        """A fresh job past the queue timeout (a preempted one was admitted once: it
        waits as long as it takes)."""
        return not (job.resume or job.preempted) and (
            time.monotonic() - job.enqueued_at > timeout_s)
