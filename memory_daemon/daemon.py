"""The loop: read the probe, ask the policy, act through the control client, sleep."""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from autoglm.control.v1 import control_service_pb2 as pb
from memory_daemon.actuator import ControlClient, service_view
from memory_daemon.config import DaemonConfig
from memory_daemon.errors import ControlCallError
from memory_daemon.metrics import DaemonMetrics
from memory_daemon.policy import Action, ActionKind, PolicyState, decide, poll_interval
from memory_daemon.probes.host import HostProbe
from memory_daemon.probes.replay import ReplayProbe, TraceRecorder
from memory_daemon.readings import DeviceReading, Probe, counting_free_kv
from memory_daemon.status import ServiceStatus, StatusSource, status_source

log = structlog.get_logger(__name__)


class Clock(Protocol):
    def now(self) -> float: ...

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        """Sleep, waking early when `stop` is set."""
        ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=seconds)


class VirtualClock:
    """Time that passes only when slept: replays a trace as fast as possible."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float, stop: asyncio.Event) -> None:
        self._now += seconds
        await asyncio.sleep(0)


@dataclass
class Daemon:
    config: DaemonConfig
    probe: Probe
    clock: Clock
    control: ControlClient | None = None
    metrics: DaemonMetrics = field(default_factory=DaemonMetrics)
    recorder: TraceRecorder | None = None
    state: PolicyState = field(default_factory=PolicyState)
    status_source: StatusSource | None = None
    ticks: int = 0
    _service_down: bool = False
    _failing: dict[str, str] = field(default_factory=dict)  # device -> its error
    _module_precisions: dict[str, str] = field(default_factory=dict)  # as last logged

    def __post_init__(self) -> None:
        if self.status_source is None and self.control is not None:
            self.status_source = status_source(self.config, self.control)

    async def tick(self) -> float:
        """One measurement and decision; returns seconds until the next one."""
        read = await self._service_status()
        status = read.status if read is not None else None
        if status is not None and status.pid and isinstance(self.probe, HostProbe):
            self.probe.report_service_pid(status.pid)
        if status is not None:
            self._log_module_precisions(status)
        readings = self.probe.read()
        if self.recorder is not None:
            self.recorder.record(readings)
        if status is not None:
            readings = counting_free_kv(readings, {d.uuid: d.kv_pool_free_bytes
                                                   for d in status.devices if d.uuid})
        self._log_reading_changes(readings)
        dry_run = self.config.daemon.dry_run
        decision = decide(
            readings,
            self.state,
            self.config.policy,
            self.clock.now(),
            service=service_view(status) if status is not None else None,
            can_act=dry_run or status is not None,
        )
        self.state = decision.state
        self.metrics.observe(readings, self.state)
        for action in decision.actions:
            await self._perform(action, readings)
        self.ticks += 1
        daemon = self.config.daemon
        interval = poll_interval(
            self.state,
            self.config.policy,
            daemon.poll_interval_min_seconds,
            daemon.poll_interval_max_seconds,
            daemon.poll_safety_factor,
        )
        log.debug(
            "memd.tick",
            tick=self.ticks,
            service_up=status is not None,
            status_from=read.origin if read is not None else None,
            actions=len(decision.actions),
            next_poll_s=round(interval, 3),
        )
        return interval

    def _log_module_precisions(self, status: pb.MemoryStatus) -> None:
        """The service's modules, their weight precision and bytes: logged when first seen
        and when a restarted service holds them in other precisions."""
        precisions = {m.name: m.weight_precision for m in status.modules}
        if precisions != self._module_precisions:
            log.info("memd.service_modules", modules={
                m.name: {"precision": m.weight_precision, "weight_bytes": m.weight_bytes,
                         "device": m.device} for m in status.modules})
            self._module_precisions = precisions

    def _log_reading_changes(self, readings: list[DeviceReading]) -> None:
        """A device that starts failing (or fails differently), and one that recovers, are
        logged once: not every tick while it stays that way."""
        for reading in readings:
            failing = self._failing.get(reading.device)
            if not reading.ok and reading.error != failing:
                log.warning("memd.reading_failed", device=reading.device, error=reading.error)
                self._failing[reading.device] = reading.error
            elif reading.ok and failing is not None:
                log.info("memd.reading_recovered", device=reading.device, failed=failing)
                del self._failing[reading.device]

    async def _service_status(self) -> ServiceStatus | None:
        if self.status_source is None:
            return None
        try:
            read = await self.status_source.read()
        except ControlCallError as exc:
            self.metrics.errors.labels("control").inc()
            if not self._service_down:
                log.warning(
                    "memd.service_unavailable", rpc=exc.rpc, code=exc.code, error=exc.details
                )
            self._service_down = True
            return None
        if self._service_down:
            log.info("memd.service_available")
        self._service_down = False
        self.metrics.status_reads.labels(read.origin).inc()
        return read

    async def _perform(self, action: Action, readings: list[DeviceReading]) -> None:
        by_device = {reading.device: reading for reading in readings if reading.ok}
        event = {
            "action": action.kind.value,
            "rule": action.rule,
            "devices": list(action.devices),
            "readings": {
                device: {
                    "used_bytes": by_device[device].total_bytes - by_device[device].free_bytes,
                    "total_bytes": by_device[device].total_bytes,
                    "used_fraction": round(by_device[device].used_fraction, 4),
                    "level": self.state.devices[device].level.name.lower(),
                }
                for device in action.devices
                if device in by_device
            },
            "target_bytes": action.target_bytes,
        }
        process_usage = getattr(self.probe, "process_usage", None)
        if process_usage is not None:
            # Advisory only: which processes hold the memory (NVML may not see all of them).
            usage = process_usage()
            event["gpu_processes"] = {d: usage[d] for d in action.devices if d in usage}
        if action.admission_limit or action.kind is ActionKind.SET_ADMISSION:
            event.update(admission=action.admission.name.lower(), limit=action.admission_limit)
        if self.config.daemon.dry_run or self.control is None:
            self.metrics.actions.labels(action.kind.value, "dry_run").inc()
            log.info("memd.action", result="dry_run", **event)
            return
        try:
            outcome = await self.control.execute(action)
        except ControlCallError as exc:
            self.metrics.actions.labels(action.kind.value, "failed").inc()
            self.metrics.errors.labels("control").inc()
            log.warning("memd.action", result="failed", error=str(exc), **event)
            return
        finally:
            self._acted()
        self.metrics.actions.labels(action.kind.value, "ok").inc()
        self.metrics.freed_bytes.labels(action.kind.value).inc(max(outcome.freed_bytes, 0))
        log.info(
            "memd.action",
            result="ok",
            freed_bytes=outcome.freed_bytes,
            duration_s=round(outcome.duration_seconds, 4),
            detail=outcome.detail,
            reading_age_s=_reading_age(action, by_device, self.clock.now()),
            **event,
        )

    def _acted(self) -> None:
        # A failed call may still have reached the service: its earlier status is void too.
        if self.status_source is not None:
            self.status_source.acted()

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until stopped, or once (`--once`), or until a replayed trace is played out."""
        try:
            await self._loop(stop)
        finally:
            if self.status_source is not None:
                await self.status_source.close()

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            interval = await self.tick()
            if self.config.daemon.once:
                return
            if isinstance(self.probe, ReplayProbe) and self.probe.exhausted:
                log.info("memd.replay_finished", ticks=self.ticks)
                return
            if isinstance(self.probe, ReplayProbe):
                upcoming = self.probe.next_offset_seconds
                if upcoming is not None and upcoming > 0:
                    interval = min(interval, upcoming)
            await self.clock.sleep(interval, stop)


def _reading_age(action: Action, by_device: dict[str, DeviceReading], now: float) -> float | None:
    """Seconds from the newest reading behind the action to the action's completion.

    With readings taken as pressure appears (a trace played at real speed) this is the
    daemon's reaction time: decision plus the control round trip.
    """
    stamps = [by_device[device].timestamp for device in action.devices if device in by_device]
    return round(now - max(stamps), 4) if stamps else None
