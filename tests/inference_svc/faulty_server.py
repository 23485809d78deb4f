"""autoglm-server with a fault planted in its model loop, for the watchdog's tests.

A prompt containing KILL-THE-LOOP ends the model thread with an error no handler may
catch; one containing STALL-THE-LOOP blocks it forever. Everything else is the real
server, started through its real entry point.
"""

from __future__ import annotations

import sys
import threading

from inference_svc.cli import main
from inference_svc.engine.model_loop import ModelLoop


class LoopKilled(BaseException):
    """Escapes every `except Exception`: the thread ends as it would on a fatal error."""


def plant_faults() -> None:
    start_all = ModelLoop._start_all

    def faulty_start_all(self, jobs):
        prompts = [self.model.tokenizer.decode(job.plan.input_ids) for job in jobs]
        if any("KILL-THE-LOOP" in p for p in prompts):
            raise LoopKilled("planted fault")
        if any("STALL-THE-LOOP" in p for p in prompts):
            threading.Event().wait()
        return start_all(self, jobs)

    ModelLoop._start_all = faulty_start_all


if __name__ == "__main__":
    plant_faults()
    sys.exit(main())
