"""Where a tick's MemoryStatus comes from: the service's WatchMemory pushes, or a poll.

In watch mode a background task subscribes to WatchMemory and keeps the newest push; a
tick takes it while it is fresh. A tick reads with GetMemoryStatus instead when there is
no usable push: the stream is (re)connecting or silent, the push is older than
`stale_after_seconds`, the service does not offer WatchMemory, or the daemon acted since
the push arrived (the push may predate the action's effect). So a service that is down
or restarting is seen exactly as in poll mode, and no tick acts on a stale status. The
subscription also ends when the service's health turns NOT_SERVING (graceful shutdown).
"""

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import grpc
import structlog

from autoglm.control.v1 import control_service_pb2 as pb
from memory_daemon.actuator import ControlClient
from memory_daemon.config import DaemonConfig
from memory_daemon.errors import ControlCallError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    status: pb.MemoryStatus
    origin: Literal["watch", "poll"]


class StatusSource(Protocol):
    async def read(self) -> ServiceStatus:
        """The status for this tick; raises `ControlCallError` when there is none."""
        ...

    def acted(self) -> None:
        """The daemon just asked the service to change: statuses until now are superseded."""
        ...

    async def close(self) -> None: ...


class PolledStatus:
    """One GetMemoryStatus per tick."""

    def __init__(self, control: ControlClient) -> None:
        self._control = control

    async def read(self) -> ServiceStatus:
        return ServiceStatus(await self._control.memory_status(), "poll")

    def acted(self) -> None:
        pass

    async def close(self) -> None:
        pass


class WatchedStatus:
    """The newest WatchMemory push, with GetMemoryStatus whenever it is unusable."""

    def __init__(
        self,
        stream: ControlClient,
        poll: ControlClient,
        interval_seconds: float,
        stale_after_seconds: float,
        backoff_initial_seconds: float,
        backoff_max_seconds: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._poll = poll
        self._interval = interval_seconds
        self._stale_after = stale_after_seconds
        self._backoff_initial = backoff_initial_seconds
        self._backoff_max = backoff_max_seconds
        self._now = now
        self._latest: pb.MemoryStatus | None = None
        self._received_at = -math.inf
        self.pushes = 0  # received, over all subscriptions
        self._pushes_seen_at_action = 0
        self.connected = False
        self._task: asyncio.Task[None] | None = None
        self.unsupported = False

    async def read(self) -> ServiceStatus:
        if self._task is None and not self.unsupported:
            self._start_watching()
        if self._usable():
            assert self._latest is not None
            return ServiceStatus(self._latest, "watch")
        try:
            return ServiceStatus(await self._poll.memory_status(), "poll")
        except ControlCallError as exc:
            if self.connected:
                # New calls refused while the stream still pushes: a graceful shutdown
                # drains open streams, but that service can no longer act. Only a new
                # subscription, to a service that accepts calls, speaks for it again.
                log.warning("memd.watch_lost", code=exc.code, error="refused new calls")
                await self._stop_watching()
                self._start_watching()
            raise

    def acted(self) -> None:
        self._pushes_seen_at_action = self.pushes

    def _usable(self) -> bool:
        return (
            self._latest is not None
            and self.pushes > self._pushes_seen_at_action
            and self._now() - self._received_at <= self._stale_after
        )

    async def _watch(self) -> None:
        """Subscribe, keep every push, resubscribe with backoff after the stream breaks."""
        delay = self._backoff_initial
        while True:
            try:
                await self._subscription()
            except ControlCallError as exc:
                self._latest = None
                if exc.code == grpc.StatusCode.UNIMPLEMENTED.name:
                    log.warning("memd.watch_unsupported", fallback="poll", error=exc.details)
                    self.unsupported = True
                    return
                if self.connected:
                    log.warning("memd.watch_lost", code=exc.code, error=exc.details)
                    delay = self._backoff_initial
                self.connected = False
            await asyncio.sleep(delay)
            delay = min(self._backoff_max, delay * 2)

    async def _subscription(self) -> None:
        """One WatchMemory stream, ended early when the service stops serving: a service
        in graceful shutdown keeps open streams until its grace period is over, and ours
        would hold its shutdown up all that time."""
        pushes = asyncio.create_task(self._take_pushes())
        stopping = asyncio.create_task(self._stream.until_not_serving())
        try:
            done, _ = await asyncio.wait((pushes, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pushes, stopping):
                task.cancel()
            await asyncio.gather(pushes, stopping, return_exceptions=True)
        for task in done:
            task.result()
        raise ControlCallError("WatchMemory", "UNAVAILABLE", "the service is not serving")

    async def _take_pushes(self) -> None:
        async for status in self._stream.watch_memory(self._interval, self._stale_after):
            if not self.connected:
                log.info("memd.watch_connected", interval_s=self._interval)
                self.connected = True
            self._latest, self._received_at = status, self._now()
            self.pushes += 1

    def _start_watching(self) -> None:
        self._task = asyncio.create_task(self._watch(), name="memd-watch-memory")

    async def _stop_watching(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._latest, self.connected = None, False

    async def close(self) -> None:
        await self._stop_watching()
        await self._stream.close()


def status_source(config: DaemonConfig, control: ControlClient) -> StatusSource:
    """The source `control.status_source` names; the stream gets a channel of its own.

    A single tick (`--once`) polls: it would be over before a subscription delivered.
    """
    if config.control.status_source == "poll" or config.daemon.once:
        return PolledStatus(control)
    return WatchedStatus(
        stream=ControlClient(config.control),
        poll=control,
        interval_seconds=config.control.watch_interval_seconds,
        stale_after_seconds=config.policy.stale_after_seconds,
        backoff_initial_seconds=config.control.backoff_initial_seconds,
        backoff_max_seconds=config.control.backoff_max_seconds,
    )
