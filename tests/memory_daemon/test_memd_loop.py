"""The daemon loop driven by the replay probe: dry run, acting over gRPC, service down."""

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from control_double import RecordingControl, start_control
from structlog.testing import capture_logs

from autoglm.control.v1 import control_service_pb2 as pb
from memory_daemon.actuator import ControlClient
from memory_daemon.config import load_config
from memory_daemon.daemon import Daemon, VirtualClock
from memory_daemon.errors import ExitCode
from memory_daemon.probes.replay import ReplayProbe, load_trace

TOTAL = 24 << 30
GPUS = ("GPU-aaaa", "GPU-bbbb")


def write_trace(path: Path, seconds: int, fraction_a: float, fraction_b: float = 0.3) -> Path:
    rows = [
        {"t": float(t), "device": device, "used": int(fraction * TOTAL), "total": TOTAL}
        for t in range(seconds)
        for device, fraction in zip(GPUS, (fraction_a, fraction_b), strict=True)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def replay_config(trace: Path, target: str, **daemon: object):
    overrides = {
        "daemon": {"probe": "replay", "poll_interval_min_seconds": 1.0, **daemon},
        "replay": {"trace": str(trace), "speed": 0.0},
        "control": {"target": target, "backoff_initial_seconds": 0.01},
        "policy": {"gc_every_seconds": 0},
    }
    return load_config(None, {}, overrides)


def replay_daemon(config, control: ControlClient | None) -> Daemon:
    clock = VirtualClock()
    probe = ReplayProbe(load_trace(config.replay.trace), clock=clock.now)
    return Daemon(config, probe, clock, control)


async def replay_against(servicer: RecordingControl, tmp_path: Path, fraction: float,
                         **daemon_settings: object) -> Daemon:
    """A daemon run to the end of a 10-second trace (GPU-aaaa at `fraction` used) against
    `servicer` on a Unix socket; the daemon, for its metrics."""
    socket = tmp_path / "control.sock"
    server, _ = await start_control(servicer, f"unix:{socket}")
    config = replay_config(write_trace(tmp_path / "t.jsonl", 10, fraction), f"unix://{socket}",
                           **daemon_settings)
    control = ControlClient(config.control, "cpu")
    daemon = replay_daemon(config, control)
    try:
        await daemon.run(asyncio.Event())
    finally:
        await control.close()
        await server.stop(None)
    return daemon


async def test_a_gpu_kv_pool_that_holds_no_token_counts_as_free(tmp_path):
    """The card reads 85% used, but a fifth of it is the service's KV pool, allocated at
    start-up and holding nothing yet: 65% is the service's work, under the soft mark, so
    the daemon leaves it alone (the same reading without the pool acts: the test below)."""
    servicer = RecordingControl()
    servicer.devices = [pb.DeviceMemory(device="cuda:0", uuid="GPU-aaaa", total_bytes=TOTAL,
                                        kv_pool_free_bytes=int(0.20 * TOTAL))]
    daemon = await replay_against(servicer, tmp_path, 0.85)
    assert servicer.count("GetMemoryStatus") + servicer.count("WatchMemory") >= 10
    assert servicer.actions() == []
    registry = daemon.metrics.registry
    assert registry.get_sample_value("memd_device_level", {"device": "GPU-aaaa"}) == 0


async def test_the_loop_acts_through_the_control_service(tmp_path):
    servicer = RecordingControl()
    daemon = await replay_against(servicer, tmp_path, 0.85)
    assert [name for name, _ in servicer.actions()] == [
        "CollectGarbage",
        "TrimKvCache",
        "OffloadModules",
        "SetAdmission",
        "SetAdmission",
    ]
    requests = [request for _, request in servicer.actions()]
    assert requests[1].target_bytes == int(0.85 * TOTAL) - int(0.70 * TOTAL)
    assert requests[2].tier == pb.TIER_CPU
    assert (requests[3].mode, requests[3].max_running) == (pb.ADMISSION_MODE_LIMITED, 2)
    assert requests[4].mode == pb.ADMISSION_MODE_PAUSED
    registry = daemon.metrics.registry
    assert registry.get_sample_value("memd_device_level", {"device": "GPU-aaaa"}) == 1
    assert registry.get_sample_value("memd_device_level", {"device": "GPU-bbbb"}) == 0
    assert (
        registry.get_sample_value("memd_actions_total", {"action": "set_admission", "result": "ok"})
        == 2
    )


async def test_dry_run_decides_without_calling(tmp_path):
    servicer = RecordingControl()
    daemon = await replay_against(servicer, tmp_path, 0.85, dry_run=True)
    assert servicer.actions() == []
    assert {name for name, _ in servicer.calls} == {"GetMemoryStatus"}
    dry = daemon.metrics.registry.get_sample_value(
        "memd_actions_total", {"action": "collect_garbage", "result": "dry_run"}
    )
    assert dry == 1


async def test_keeps_polling_while_the_service_is_down(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 20, 0.95)
    config = replay_config(trace, f"unix://{tmp_path / 'nobody.sock'}")
    control = ControlClient(config.control, "cpu")
    daemon = replay_daemon(config, control)
    try:
        await daemon.run(asyncio.Event())
    finally:
        await control.close()
    assert daemon.ticks >= 20
    registry = daemon.metrics.registry
    assert registry.get_sample_value("memd_errors_total", {"source": "control"}) >= 20
    assert registry.get_sample_value("memd_device_level", {"device": "GPU-aaaa"}) == 2


async def test_a_failing_device_is_logged_when_it_changes_not_every_tick(tmp_path):
    ok = {"device": "GPU-aaaa", "used": TOTAL // 2, "total": TOTAL}
    errors = ["GpuIsLost"] * 4 + ["Unknown"] * 3
    rows = [
        {"t": 0.0, **ok},
        *({"t": float(t), "device": "GPU-aaaa", "ok": False, "error": error}
          for t, error in enumerate(errors, start=1)),
        {"t": 8.0, **ok},
        {"t": 9.0, **ok},
    ]  # fmt: skip
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps(row) + "\n" for row in rows))
    daemon = replay_daemon(replay_config(trace, "unix:///nonexistent.sock", dry_run=True), None)
    with capture_logs() as logs:
        await daemon.run(asyncio.Event())
    assert daemon.ticks == len(rows)
    reading_events = [
        (event["event"], event.get("error") or event.get("failed"))
        for event in logs
        if event["event"].startswith("memd.reading_")
    ]
    assert reading_events == [
        ("memd.reading_failed", "GpuIsLost"),
        ("memd.reading_failed", "Unknown"),
        ("memd.reading_recovered", "Unknown"),
    ]
    failures = daemon.metrics.registry.get_sample_value(
        "memd_reading_failures_total", {"device": "GPU-aaaa"}
    )
    assert failures == len(errors)  # the metric still counts every failed reading


async def test_module_precisions_are_logged_when_first_seen_and_when_they_change(tmp_path):
    servicer = RecordingControl()
    servicer.modules = [
        pb.ModuleResidency(name="decoder", weight_precision="int8", weight_bytes=220 << 20,
                           device="cpu"),
        pb.ModuleResidency(name="vision", weight_precision="fp32", weight_bytes=24 << 20,
                           device="cpu"),
    ]
    socket = tmp_path / "control.sock"
    server, _ = await start_control(servicer, f"unix:{socket}")
    trace = write_trace(tmp_path / "t.jsonl", 10, 0.5)
    config = replay_config(trace, f"unix://{socket}", dry_run=True)
    control = ControlClient(config.control, "cpu")
    daemon = replay_daemon(config, control)
    try:
        with capture_logs() as logs:
            for _ in range(3):
                await daemon.tick()
            servicer.modules[0].weight_precision = "fp32"  # a restart with other flags
            await daemon.tick()
    finally:
        await control.close()
        await server.stop(None)
    seen = [event["modules"] for event in logs if event["event"] == "memd.service_modules"]
    assert seen == [
        {"decoder": {"precision": "int8", "weight_bytes": 220 << 20, "device": "cpu"},
         "vision": {"precision": "fp32", "weight_bytes": 24 << 20, "device": "cpu"}},
        {"decoder": {"precision": "fp32", "weight_bytes": 220 << 20, "device": "cpu"},
         "vision": {"precision": "fp32", "weight_bytes": 24 << 20, "device": "cpu"}},
    ]


async def test_once_runs_a_single_tick(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 20, 0.5)
    config = replay_config(trace, "unix:///nonexistent.sock", once=True, dry_run=True)
    daemon = replay_daemon(config, None)
    await daemon.run(asyncio.Event())
    assert daemon.ticks == 1


def test_cli_replays_a_trace_in_dry_run_and_logs_json_decisions(tmp_path):
    trace = write_trace(tmp_path / "t.jsonl", 10, 0.85)
    record = tmp_path / "recorded.jsonl"
    done = subprocess.run(
        [
            sys.executable, "-m", "memory_daemon",
            "--probe", "replay", "--trace", str(trace), "--replay-speed", "0",
            "--control", f"unix://{tmp_path / 'nobody.sock'}", "--poll-interval", "1",
            "--dry-run", "--record", str(record),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == ExitCode.OK, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    actions = [e for e in events if e["event"] == "memd.action"]
    assert [a["action"] for a in actions] == [
        "collect_garbage",
        "trim_kv",
        "offload_encoders",
        "set_admission",
        "set_admission",
    ]
    first = actions[0]
    assert first["result"] == "dry_run"
    assert first["devices"] == ["GPU-aaaa"]
    assert first["readings"]["GPU-aaaa"]["level"] == "soft"
    assert first["rule"] == "soft_sustained:collect_garbage"
    assert events[-1]["event"] == "memd.stopped"
    recorded = load_trace(record)
    assert {row.device for row in recorded} == set(GPUS)
    assert recorded[0].used == int(0.85 * TOTAL)
