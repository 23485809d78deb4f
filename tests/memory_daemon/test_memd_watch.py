"""Status from WatchMemory: pushed statuses drive ticks, stale ones never do, and polling
takes over where the stream cannot (no such RPC, service down, right after an action)."""

import asyncio
import os
from pathlib import Path

import pytest
from control_double import RecordingControl, WatchingControl, start_control
from grpc_health.v1 import health, health_pb2
from structlog.testing import capture_logs

from autoglm.control.v1 import control_service_pb2 as pb
from memory_daemon.actuator import ControlClient
from memory_daemon.config import DaemonConfig, load_config
from memory_daemon.daemon import Daemon, VirtualClock
from memory_daemon.errors import ControlCallError
from memory_daemon.probes.host import HostProbe
from memory_daemon.readings import DeviceReading
from memory_daemon.status import PolledStatus, WatchedStatus
from tests.support.polling import wait_until_async

# The servers run in the session loop; the tests must run in the same loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

TOTAL = 24 << 30
CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["ControlService"].full_name
STALE_AFTER = 10.0


class FixedProbe:
    """One device at a fixed fill, read at the clock's time."""

    def __init__(self, clock: VirtualClock, fraction: float) -> None:
        self._clock = clock
        self._used = int(fraction * TOTAL)

    def read(self) -> list[DeviceReading]:
        free = TOTAL - self._used
        return [DeviceReading("GPU-0", self._clock.now(), TOTAL, self._used, free)]

    def close(self) -> None:
        pass


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def config_for(
    socket: Path, source: str = "watch", watch_interval: float = 5.0, **policy: float
) -> DaemonConfig:
    overrides = {
        "daemon": {"probe": "host"},
        "control": {
            "target": f"unix://{socket}",
            "status_source": source,
            "watch_interval_seconds": watch_interval,
            "backoff_initial_seconds": 0.01,
            "backoff_max_seconds": 0.02,
        },
        "policy": {"gc_every_seconds": 0, "stale_after_seconds": STALE_AFTER, **policy},
    }
    return load_config(None, {}, overrides)


def watched(config: DaemonConfig, control: ControlClient, now: FakeTime) -> WatchedStatus:
    return WatchedStatus(
        stream=ControlClient(config.control),
        poll=control,
        interval_seconds=config.control.watch_interval_seconds,
        stale_after_seconds=STALE_AFTER,
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.02,
        now=now,
    )


def reads(daemon: Daemon, origin: str) -> float:
    value = daemon.metrics.registry.get_sample_value(
        "memd_status_reads_total", {"origin": origin}
    )
    return value or 0.0


async def test_ticks_take_the_pushed_status_instead_of_polling(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl(pid=1)
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket)
    control = ControlClient(config.control)
    probe = HostProbe(pid=0, budget_bytes=1 << 40, cgroup_root=str(tmp_path))
    daemon = Daemon(config, probe, VirtualClock(), control)
    source = daemon.status_source
    assert isinstance(source, WatchedStatus)
    try:
        await daemon.tick()  # before the first push arrives: one GetMemoryStatus
        assert probe.pid == 1
        await wait_until_async(lambda: source.pushes == 1, what="the first push")
        servicer.pid = os.getpid()
        await servicer.push()
        await wait_until_async(lambda: source.pushes == 2, what="the second push")
        for _ in range(5):
            await daemon.tick()
        assert probe.pid == os.getpid()  # learned from the push
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert servicer.count("GetMemoryStatus") == 1
    assert servicer.count("WatchMemory") == 1
    assert dict(servicer.calls)["WatchMemory"] == pb.WatchMemoryRequest(interval_seconds=5.0)
    assert (reads(daemon, "poll"), reads(daemon, "watch")) == (1, 5)


async def test_a_stale_push_is_never_acted_on(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket)
    control = ControlClient(config.control)
    now = FakeTime()
    source = watched(config, control, now)
    clock = VirtualClock()
    daemon = Daemon(config, FixedProbe(clock, 0.95), clock, control, status_source=source)
    try:
        assert (await source.read()).origin == "poll"  # before the first push
        servicer.calls.clear()
        await wait_until_async(lambda: source.pushes == 1, what="the first push")
        servicer.fail_next = 1000  # every unary call from now on is UNAVAILABLE
        now.now = STALE_AFTER + 0.1  # the one push has aged past stale_after_seconds
        for _ in range(3):
            await daemon.tick()
            await clock.sleep(1.0, asyncio.Event())
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    # Hard pressure, but no usable status: the service counts as unavailable, nothing is done.
    assert servicer.actions() == []
    assert servicer.count("GetMemoryStatus") == 3
    assert reads(daemon, "watch") == 0
    errors = daemon.metrics.registry.get_sample_value("memd_errors_total", {"source": "control"})
    assert errors == 3


async def test_a_push_from_before_an_action_is_superseded(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket)
    control = ControlClient(config.control)
    source = watched(config, control, FakeTime())
    try:
        assert (await source.read()).origin == "poll"
        await wait_until_async(lambda: source.pushes == 1, what="the first push")
        assert (await source.read()).status.admission_mode == pb.ADMISSION_MODE_OPEN
        servicer.admission = pb.ADMISSION_MODE_PAUSED  # what the daemon's action did
        source.acted()
        after_action = await source.read()
        await servicer.push()
        await wait_until_async(lambda: source.pushes == 2, what="the push after the action")
        next_push = await source.read()
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert (after_action.origin, after_action.status.admission_mode) == (
        "poll",
        pb.ADMISSION_MODE_PAUSED,
    )
    assert (next_push.origin, next_push.status.admission_mode) == (
        "watch",
        pb.ADMISSION_MODE_PAUSED,
    )
    assert servicer.count("GetMemoryStatus") == 2


async def test_without_watch_memory_every_tick_polls_and_still_acts(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = RecordingControl()  # WatchMemory answers UNIMPLEMENTED
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket, min_samples_above_soft=0, min_seconds_above_soft=0)
    control = ControlClient(config.control)
    clock = VirtualClock()
    daemon = Daemon(config, FixedProbe(clock, 0.85), clock, control)
    source = daemon.status_source
    assert isinstance(source, WatchedStatus)
    try:
        with capture_logs() as logs:
            await daemon.tick()
            await wait_until_async(lambda: source.unsupported, what="the stream refused")
            for _ in range(4):
                await clock.sleep(1.0, asyncio.Event())
                await daemon.tick()
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert servicer.count("GetMemoryStatus") == 5
    assert (reads(daemon, "poll"), reads(daemon, "watch")) == (5, 0)
    assert [e["event"] for e in logs].count("memd.watch_unsupported") == 1
    assert servicer.actions()[0][0] == "CollectGarbage"


async def test_a_single_tick_polls():
    config = load_config(None, {}, {"daemon": {"once": True}})
    control = ControlClient(config.control)
    clock = VirtualClock()
    daemon = Daemon(config, FixedProbe(clock, 0.3), clock, control)
    assert isinstance(daemon.status_source, PolledStatus)


async def test_poll_mode_never_subscribes(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket, source="poll")
    control = ControlClient(config.control)
    clock = VirtualClock()
    daemon = Daemon(config, FixedProbe(clock, 0.3), clock, control)
    assert isinstance(daemon.status_source, PolledStatus)
    try:
        for _ in range(3):
            await daemon.tick()
            await clock.sleep(1.0, asyncio.Event())
    finally:
        await control.close()
        await server.stop(None)
    assert servicer.count("GetMemoryStatus") == 3
    assert servicer.count("WatchMemory") == 0


async def test_the_stream_is_resubscribed_after_the_service_restarts(tmp_path):
    socket = tmp_path / "control.sock"
    first = WatchingControl(pid=1)
    server, _ = await start_control(first, f"unix:{socket}")
    config = config_for(socket)
    control = ControlClient(config.control)
    source = watched(config, control, FakeTime())
    try:
        await source.read()
        await wait_until_async(lambda: source.pushes == 1, what="the first push")
        with capture_logs() as logs:
            await server.stop(None)
            await wait_until_async(lambda: not source.connected, what="the stream lost")
            with pytest.raises(ControlCallError, match="UNAVAILABLE"):
                await source.read()  # the pushed status went with the stream; no poll either
            second = WatchingControl(pid=2)
            server, _ = await start_control(second, f"unix:{socket}")
            await asyncio.wait_for(second.subscribed.wait(), 10)
            await wait_until_async(lambda: source.pushes == 2, what="the push after the restart")
            back = await source.read()
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert (back.origin, back.status.pid) == ("watch", 2)
    assert second.count("GetMemoryStatus") == 0
    events = [e["event"] for e in logs]
    assert events.count("memd.watch_lost") == 1
    assert events.count("memd.watch_connected") == 1


async def test_a_silent_stream_is_resubscribed(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()  # pushes once per subscription unless told to
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket, watch_interval=0.1, stale_after_seconds=0.3)
    control = ControlClient(config.control)
    source = WatchedStatus(
        stream=ControlClient(config.control),
        poll=control,
        interval_seconds=0.1,
        stale_after_seconds=0.3,
        backoff_initial_seconds=0.01,
        backoff_max_seconds=0.02,
    )
    try:
        await source.read()
        # The double pushes once per subscription: a second push needs a second one.
        await wait_until_async(lambda: source.pushes >= 2, what="a push from a second subscription")
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert servicer.count("WatchMemory") >= 2


async def test_pushes_from_a_draining_service_are_not_used(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = config_for(socket)
    control = ControlClient(config.control)
    source = watched(config, control, FakeTime())
    try:
        await source.read()
        await wait_until_async(lambda: source.pushes == 1, what="the first push")
        # A graceful stop refuses new calls but lets the open stream go on pushing.
        stopping = asyncio.create_task(server.stop(grace=30))
        await asyncio.sleep(0)  # the stop's first step runs: new calls are refused from now on
        await servicer.push()
        await wait_until_async(lambda: source.pushes == 2, what="a push while draining")
        source.acted()  # say an action just failed: the next read must poll
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append((await source.read()).origin)
            except ControlCallError as exc:
                outcomes.append(exc.code)
            delivered = source.pushes + 1
            await servicer.push()  # a stream still open would deliver it before the next read
            await wait_until_async(
                lambda n=delivered: source.pushes == n or servicer.open_streams == 0,
                what="the push delivered, or no stream left to deliver it",
            )
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
        await stopping
    assert outcomes == ["UNAVAILABLE"] * 3
    assert servicer.count("WatchMemory") == 1  # resubscribing was refused as well


async def test_the_stream_lets_go_when_the_service_shuts_down_gracefully(tmp_path):
    socket = tmp_path / "control.sock"
    servicer = WatchingControl()
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set(CONTROL_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    server, _ = await start_control(servicer, f"unix:{socket}", health_servicer)
    config = config_for(socket)
    control = ControlClient(config.control)
    source = watched(config, control, FakeTime())
    try:
        await source.read()
        await wait_until_async(lambda: source.connected, what="subscribed")
        await health_servicer.enter_graceful_shutdown()
        stopping = asyncio.create_task(server.stop(grace=60))
        # Else the service would wait out its whole grace period for our stream (or until
        # the daemon finds the stream silent for stale_after_seconds).
        await wait_until_async(
            lambda: servicer.open_streams == 0, STALE_AFTER / 2, "the daemon closed its stream"
        )
        await stopping
        with pytest.raises(ControlCallError):
            await source.read()
    finally:
        await source.close()
        await control.close()
        await server.stop(None)
    assert not source.connected
    assert servicer.count("WatchMemory") == 1  # not resubscribed to the stopping service
