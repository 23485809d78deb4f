"""The watchdog: a model loop that stops, or stalls with work pending, is never silent.

When it sees either, health turns NOT_SERVING at once, every open request ends with
UNAVAILABLE, and the service exits non-zero so that its supervisor (systemd,
Kubernetes) restarts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from inference_svc.errors import NotReady

log = structlog.get_logger(__name__)
EXIT_CODE = 70  # EX_SOFTWARE: an internal error the process cannot recover from


class Watchdog:
    def __init__(self, engine, *, stall_timeout_s: float,
                 on_fault: Callable[[str], Awaitable[None]], interval_s: float = 0.2) -> None:
        self.engine = engine
        self.stall_timeout_s = stall_timeout_s
        self.on_fault = on_fault
        self.interval_s = interval_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            fault = self.engine.fault(self.stall_timeout_s)
            if fault is None:
                continue
            log.critical("model_loop_fault", fault=fault, exit_code=EXIT_CODE)
            await self.on_fault(fault)
            ended = self.engine.fail_all(NotReady(
                f"{fault}; the service is restarting, retry shortly"))
            log.critical("requests_ended_by_watchdog", requests=ended)
            return
