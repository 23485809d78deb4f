"""The host and replay probes, and the trace recorder."""

import io
import json
import os

import psutil
import pytest

from memory_daemon.errors import ProbeUnavailableError
from memory_daemon.probes.host import HOST_DEVICE, HostProbe
from memory_daemon.probes.replay import ReplayProbe, TraceRecorder, load_trace
from memory_daemon.readings import DeviceReading

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
