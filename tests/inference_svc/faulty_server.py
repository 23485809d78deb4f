"""autoglm-server with a fault planted in its model loop, for the watchdog's tests.

A prompt containing KILL-THE-LOOP ends the model thread with an error no handler may
catch; one containing STALL-THE-LOOP blocks it forever. Everything else is the real
server, started through its real entry point.
"""

from __future__ import annotations

import sys
import threading

from inference_svc.cli import main
from inference_svc.engine.scheduler import Scheduler


class LoopKilled(BaseException):
    """Escapes every `except Exception`: the thread ends as it would on a fatal error."""


def plant_faults() -> None:
    start = Scheduler._start

    def faulty_start(self, job):
        prompt = self.tokenizer.decode(job.plan.input_ids)
        if "KILL-THE-LOOP" in prompt:
            raise LoopKilled("planted fault")
        if "STALL-THE-LOOP" in prompt:
            threading.Event().wait()
        return start(self, job)

    Scheduler._start = faulty_start


if __name__ == "__main__":
    plant_faults()
    sys.exit(main())
