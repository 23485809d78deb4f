"""The model thread: one step after another, each read as plan -> run -> update.

    plan = scheduler.schedule()    admit what fits, stop what was cancelled, choose the
                                   prompt chunks and decode rows of the step
    out = runner.run(plan)         one forward for all of them, tokens chosen on the
                                   model's device
    scheduler.update(plan, out)    tokens streamed, prompts advanced, what ended ends

and then the KV account is published and the step's messages are delivered, in that
order (a client that reads the account after a message sees what it says). Between
steps the loop runs control tasks (`call`: KV trims, offloads), which must not race the
step. KV lives in blocks (engine/kv_blocks.py); joining or leaving the batch moves no
KV and pads nothing.

Containment: no exception ends the loop. The runner and the scheduler attribute a
failure to the request it belongs to (a row whose scores are not finite, a prompt, a
stream), which fails alone; an error in work the requests share fails those in flight,
and the loop goes on. `heartbeat` tells the service's watchdog that the loop is alive
and making progress.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import structlog

from inference_svc.engine.compute_threads import use_compute_threads
from inference_svc.engine.config import EngineConfig
from inference_svc.engine.kv_blocks import BlockLedger, KVAccount
from inference_svc.engine.runner import ModelRunner
from inference_svc.engine.scheduler import Scheduler
from inference_svc.engine.sessions import SessionStore
from inference_svc.engine.step import StepPlan
from inference_svc.process_memory import release_freed_memory

log = structlog.get_logger("engine")


class ModelLoop:
    def __init__(self, model, config: EngineConfig, sessions: SessionStore,
                 ledger: BlockLedger, observer=None) -> None:
        self.config = config
        self.sessions = sessions
        self.ledger = ledger
        self.scheduler = Scheduler(
            config, ledger, sessions, tokenizer=model.tokenizer, eos_ids=model.eos_token_ids,
            chunk_tokens=config.prefill_chunk_tokens or model.context_length, observer=observer)
        self.runner = ModelRunner(model, ledger.pool, relieve=self._relieve)
        self.requests = self.scheduler.requests  # what other threads queue and read
        self.heartbeat = time.monotonic()  # last sign of progress, for the watchdog
        self.kv_account: KVAccount = ledger.account()
        self._tasks: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()
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

    @property
    def swaps(self) -> int:
        return self.scheduler.room.swaps

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

    def kv_estimate(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """KV a request holds at its longest: prompt plus every token it may generate."""
        return self.ledger.blocks_for(prompt_tokens + max_new_tokens) * self.ledger.bytes_per_block

    # ---- the loop ----------------------------------------------------------------

    def _run(self) -> None:
        use_compute_threads(self.config.compute_threads)
        while True:
            self.heartbeat = time.monotonic()
            try:
                if not self._iterate():
                    return
            except Exception as error:  # shared work failed: contain it, keep serving
                self.scheduler.endings.fail_in_flight(error)
                self._deliver()

    def _iterate(self) -> bool:
        """Control tasks, then one step (or a wait for work); False once told to stop."""
        self._run_tasks()
        plan = self.scheduler.schedule()
        self._deliver()
        if plan is None:
            return False
        if plan.empty:
            self._wait_for_work()
        else:
            self._step(plan)
        return True

    def _step(self, plan: StepPlan) -> None:
        out = self.runner.run(plan)
        self.heartbeat = time.monotonic()
        self.scheduler.update(plan, out)
        self._deliver()

    def _deliver(self) -> None:
        """Publish the KV account, then send the messages of what happened."""
        self.kv_account = self.ledger.account()
        self.scheduler.outbox.deliver()

    def _wait_for_work(self) -> None:
        """Nothing runs: wait for a request, a control task or an admission change; idle
        sessions past their time to live expire meanwhile."""
        if not self.requests.wait_for_work(timeout=1.0):
            self.sessions.expire_idle()

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
            self.kv_account = self.ledger.account()

    def _relieve(self) -> None:
        """Out of memory: every idle cache goes, freed memory goes back, before a retry."""
        freed = self.sessions.evict_lru(0)
        release_freed_memory()
        log.warning("out_of_memory_retry", freed_bytes=freed.freed_bytes,
                    evicted=len(freed.sessions))
