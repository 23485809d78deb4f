"""Benchmarks of the daemon against a real service: reaction time, its own CPU and memory.

Run: .venv/bin/pytest -m bench -s tests/memory_daemon/test_memd_bench.py
The numbers are printed; the asserts only check that each measurement happened.
"""

import statistics
import time
from datetime import datetime

import psutil
import pytest
from memd_harness import GIB, DaemonProcess, Service, write_policy, write_trace

from autoglm.control.v1 import control_service_pb2 as control_pb
from tests.conftest import start_server

pytestmark = pytest.mark.bench

ONSET_S = 1.0  # trace time at which usage jumps above the hard mark
RUNS = 3
IDLE_SECONDS = 20.0


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    process = start_server(tmp_path_factory.mktemp("bench-server"), tiny_bundle)
    yield process
    process.terminate()


def reset(service: Service) -> None:
    service.control.SetAdmission(
        control_pb.SetAdmissionRequest(mode=control_pb.ADMISSION_MODE_OPEN)
    )
    service.control.ReloadModules(control_pb.ReloadModulesRequest())


def one_reaction(server, service: Service, tmp_path, run: int) -> dict[str, float]:
    """Play calm -> hard at real speed with the default poll interval; time the effects."""
    trace = write_trace(
        tmp_path / f"onset-{run}.jsonl", [(ONSET_S, 0.5), (6.0, 0.95)], 0.5, 24 * GIB
    )
    config = write_policy(tmp_path / "memd.toml")
    daemon = DaemonProcess(
        ["--config", str(config), "--probe", "replay", "--trace", str(trace),
         "--replay-speed", "1", "--control", server.control_target]
    )  # fmt: skip
    paused_at = None
    while daemon.process.poll() is None:
        status = service.status()
        if paused_at is None and status.admission_mode == control_pb.ADMISSION_MODE_PAUSED:
            paused_at = time.time()
        time.sleep(0.005)
    assert daemon.wait_exit() == 0, daemon.tail()
    onset = epoch(daemon.named("memd.started")[0]["timestamp"]) + ONSET_S
    gc = daemon.actions()[0]
    assert gc["action"] == "collect_garbage" and gc["result"] == "ok"
    service_gc = [
        line
        for line in server.log_lines()
        if line.get("event") == "memory_action" and line.get("action") == "collect_garbage"
    ][-1]
    assert paused_at is not None
    return {
        "daemon_reading_to_gc_applied_s": gc["reading_age_s"],
        "onset_to_service_gc_logged_s": epoch(service_gc["timestamp"]) - onset,
        "gc_rpc_s": gc["duration_s"],
        "onset_to_admission_paused_s": paused_at - onset,
    }


def test_reaction_time(server, tmp_path):
    service = Service(server.target, server.control_target)
    try:
        runs = []
        for run in range(RUNS):
            reset(service)
            runs.append(one_reaction(server, service, tmp_path, run))
    finally:
        reset(service)
        service.close()
    print(f"\nreaction, replay probe at real speed, default poll interval, {RUNS} runs:")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"  {key}: median {statistics.median(values):.4f} s, all {values}")
    assert all(r["daemon_reading_to_gc_applied_s"] > 0 for r in runs)


def idle_usage(server, args: list[str], seconds: float) -> tuple[float, int, int]:
    daemon = DaemonProcess(
        ["--probe", "host", "--control", server.control_target, "--log-level", "debug", *args]
    )
    try:
        daemon.wait_for(lambda: daemon.named("memd.tick"))
        process = psutil.Process(daemon.pid)
        before = process.cpu_times()
        ticks_before = len(daemon.named("memd.tick"))
        time.sleep(seconds)
        after = process.cpu_times()
        rss = process.memory_info().rss
        ticks = len(daemon.named("memd.tick")) - ticks_before
    finally:
        assert daemon.stop() == 0, daemon.tail()
    cpu = (after.user - before.user) + (after.system - before.system)
    return cpu / seconds, rss, ticks


def test_idle_cpu_and_memory(server):
    print(f"\ndaemon against an idle service (host probe), {IDLE_SECONDS:.0f} s each:")
    settings = (("default adaptive poll", []), ("--poll-interval 0.5", ["--poll-interval", "0.5"]))
    for label, args in settings:
        cpu_share, rss, ticks = idle_usage(server, args, IDLE_SECONDS)
        print(
            f"  {label}: CPU {100 * cpu_share:.3f} % of one core, RSS {rss / 2**20:.1f} MiB, "
            f"{ticks} ticks"
        )
        assert rss > 0 and ticks > 0
