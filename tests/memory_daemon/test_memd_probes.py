"""The host and replay probes, and the trace recorder."""

import io
import json
import os
import sys
from collections.abc import Iterator

import psutil
import pytest
from structlog.testing import capture_logs

from memory_daemon.errors import ProbeUnavailableError
from memory_daemon.probes.host import HOST_DEVICE, HostProbe, read_pid_file
from memory_daemon.probes.replay import ReplayProbe, TraceRecorder, load_trace
from memory_daemon.readings import DeviceReading
from tests.support.polling import wait_until

GIB = 1 << 30


def test_host_probe_reads_the_service_rss_against_the_budget(tmp_path):
    probe = HostProbe(pid=os.getpid(), budget_bytes=64 * GIB, cgroup_root=tmp_path, clock=lambda: 3)
    (reading,) = probe.read()
    rss = psutil.Process().memory_info().rss
    assert reading.ok and reading.device == HOST_DEVICE and reading.timestamp == 3
    assert reading.total_bytes == 64 * GIB
    assert abs(reading.used_bytes - rss) < 256 << 20
    assert reading.free_bytes == reading.total_bytes - reading.used_bytes


def test_host_probe_without_a_pid_or_with_a_dead_pid_fails_the_reading(tmp_path):
    assert not HostProbe(pid=0, cgroup_root=tmp_path).read()[0].ok
    dead = psutil.Popen(["true"])
    dead.wait()
    (reading,) = HostProbe(pid=dead.pid, cgroup_root=tmp_path).read()
    assert not reading.ok
    assert str(dead.pid) in reading.error


@pytest.fixture
def children() -> Iterator[list[psutil.Popen]]:
    """Real processes standing in for a service and its restarted successor."""
    started: list[psutil.Popen] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
            child.wait()


def spawn(children: list[psutil.Popen]) -> psutil.Popen:
    child = psutil.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    children.append(child)
    return child


def wait_until_zombie(child: psutil.Popen, timeout: float = 30.0) -> None:
    wait_until(lambda: child.status() == psutil.STATUS_ZOMBIE, timeout,
               f"{child.pid} a zombie", interval=0.01)


def pid_events(logs: list[dict]) -> list[tuple[str, int, str]]:
    return [
        (event["event"], event["pid"], event["source"])
        for event in logs
        if event["event"] in ("memd.service_pid_lost", "memd.service_pid_found")
    ]


def test_host_probe_follows_the_service_pid_once_the_given_pid_is_gone(tmp_path, children):
    first, second = spawn(children), spawn(children)
    probe = HostProbe(pid=first.pid, budget_bytes=64 * GIB, cgroup_root=tmp_path)
    with capture_logs() as logs:
        assert probe.read()[0].ok and probe.pid == first.pid
        probe.report_service_pid(second.pid)
        assert probe.read()[0].ok and probe.pid == first.pid  # --pid wins while it lives
        first.kill()
        wait_until_zombie(first)  # not reaped yet: a zombie is gone too
        (reading,) = probe.read()
        assert reading.ok and probe.pid == second.pid
        first.wait()
        for _ in range(3):
            assert probe.read()[0].ok and probe.pid == second.pid
    assert pid_events(logs) == [
        ("memd.service_pid_found", first.pid, "pid"),
        ("memd.service_pid_lost", first.pid, "pid"),
        ("memd.service_pid_found", second.pid, "service"),
    ]
    assert logs[-1]["previous"] == first.pid


def test_host_probe_waits_for_a_successor_and_logs_the_loss_once(tmp_path, children):
    first, second = spawn(children), spawn(children)
    pid_file = tmp_path / "port.json"
    pid_file.write_text(json.dumps({"port": 1, "pid": first.pid, "serving": True}))
    probe = HostProbe(pid_file=pid_file, budget_bytes=64 * GIB, cgroup_root=tmp_path)
    with capture_logs() as logs:
        assert probe.read()[0].ok and probe.pid == first.pid
        first.kill()
        first.wait()
        for _ in range(4):
            (reading,) = probe.read()
            assert not reading.ok and str(first.pid) in reading.error
            assert probe.pid == 0
        pid_file.write_text(f"{second.pid}\n")
        assert probe.read()[0].ok and probe.pid == second.pid
    assert pid_events(logs) == [
        ("memd.service_pid_found", first.pid, "pid_file"),
        ("memd.service_pid_lost", first.pid, "pid_file"),
        ("memd.service_pid_found", second.pid, "pid_file"),
    ]


def test_a_restarted_service_reporting_a_new_pid_is_followed_at_once(tmp_path, children):
    first, second = spawn(children), spawn(children)
    probe = HostProbe(budget_bytes=64 * GIB, cgroup_root=tmp_path)
    assert not probe.read()[0].ok
    probe.report_service_pid(first.pid)
    assert probe.read()[0].ok and probe.pid == first.pid
    probe.report_service_pid(second.pid)
    assert probe.read()[0].ok and probe.pid == second.pid


@pytest.mark.parametrize(
    ("text", "pid"),
    [
        ("4242\n", 4242),
        ('{"port": 50051, "pid": 4242, "serving": true}', 4242),
        ('{"pid": "4242"}', 0),
        ('{"pid": true}', 0),
        ("[4242]", 0),
        ("not a pid", 0),
        ("", 0),
    ],
)
def test_pid_files_hold_a_number_or_json_with_a_pid(tmp_path, text, pid):
    path = tmp_path / "service.pid"
    path.write_text(text)
    assert read_pid_file(path) == pid
    assert read_pid_file(tmp_path / "absent.pid") == 0


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.current": "900", "memory.max": "1000"}, (900, 1000)),
        ({"memory.current": "900", "memory.max": "max"}, None),
        (
            {"memory/memory.usage_in_bytes": "700", "memory/memory.limit_in_bytes": "800"},
            (700, 800),
        ),
        (
            {"memory/memory.usage_in_bytes": "7", "memory/memory.limit_in_bytes": str(1 << 62)},
            None,
        ),
    ],
)
def test_host_probe_uses_cgroup_limits_where_they_exist(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    probe = HostProbe(pid=os.getpid(), budget_bytes=64 * GIB, cgroup_root=tmp_path)
    (reading,) = probe.read()
    if expected is None:
        assert reading.total_bytes == 64 * GIB
    else:
        assert (reading.used_bytes, reading.total_bytes) == expected


def test_replay_plays_rows_against_the_clock(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [
        {"t": 0, "device": "g0", "used": 10, "total": 100},
        {"t": 2, "device": "g0", "used": 50, "total": 100},
        {"t": 2, "device": "g1", "ok": False, "error": "GpuIsLost"},
    ]
    trace.write_text("# a comment\n" + "".join(json.dumps(r) + "\n" for r in rows))
    now = [100.0]
    probe = ReplayProbe(load_trace(trace), clock=lambda: now[0], speed=2.0)
    assert [(r.device, r.used_bytes, r.timestamp) for r in probe.read()] == [("g0", 10, 100.0)]
    assert probe.next_offset_seconds == 1.0
    now[0] = 101.0
    readings = {r.device: r for r in probe.read()}
    assert (readings["g0"].used_bytes, readings["g0"].timestamp) == (50, 101.0)
    assert not readings["g1"].ok and readings["g1"].error == "GpuIsLost"
    assert probe.exhausted


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"t": 0, "device": "g0", "used": 5}', "need 0 <= used <= total"),
        ('{"device": "g0", "used": 5, "total": 10}', "bad trace line"),
        ('{"t": -1, "device": "g0", "used": 5, "total": 10}', "t must be"),
        ("not json", "bad trace line"),
    ],
)
def test_bad_trace_lines_name_the_line(tmp_path, line, message):
    trace = tmp_path / "t.jsonl"
    trace.write_text(line + "\n")
    with pytest.raises(ProbeUnavailableError, match=message) as raised:
        load_trace(trace)
    assert "t.jsonl:1" in str(raised.value)


def test_missing_or_empty_trace_is_a_probe_error(tmp_path):
    with pytest.raises(ProbeUnavailableError, match="cannot read trace"):
        load_trace(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProbeUnavailableError, match="no readings"):
        load_trace(tmp_path / "empty.jsonl")


def test_recorded_readings_replay_identically(tmp_path):
    readings = [
        DeviceReading("g0", 50.0, total_bytes=100, used_bytes=40, free_bytes=55),
        DeviceReading.failed("g1", 50.5, "GpuIsLost"),
        DeviceReading("g0", 51.5, total_bytes=100, used_bytes=45, free_bytes=50),
    ]
    sink = io.StringIO()
    TraceRecorder(sink).record(readings)
    trace = tmp_path / "recorded.jsonl"
    trace.write_text(sink.getvalue())
    rows = load_trace(trace)
    assert [(r.offset, r.device, r.ok) for r in rows] == [
        (0.0, "g0", True),
        (0.5, "g1", False),
        (1.5, "g0", True),
    ]
    now = [0.0]
    probe = ReplayProbe(rows, clock=lambda: now[0])
    now[0] = 1.5
    replayed = {r.device: r for r in probe.read()}
    assert (replayed["g0"].used_bytes, replayed["g0"].free_bytes) == (45, 50)
    assert replayed["g1"].error == "GpuIsLost"


def test_an_empty_kv_pool_counts_as_free_on_its_card_only():
    from memory_daemon.readings import DeviceReading, counting_free_kv

    gib = 1 << 30
    readings = [DeviceReading("GPU-a", 1.0, total_bytes=24 * gib, used_bytes=20 * gib,
                              free_bytes=4 * gib),
                DeviceReading("GPU-b", 1.0, total_bytes=24 * gib, used_bytes=2 * gib,
                              free_bytes=22 * gib),
                DeviceReading.failed("GPU-c", 1.0, "lost")]
    free_kv = {"GPU-a": 6 * gib, "GPU-b": 5 * gib, "GPU-c": gib}
    a, b, c = counting_free_kv(readings, free_kv)
    assert (a.used_bytes, a.free_bytes) == (14 * gib, 10 * gib)
    assert (b.used_bytes, b.free_bytes) == (0, 24 * gib)  # never more than was used
    assert c == readings[2]
