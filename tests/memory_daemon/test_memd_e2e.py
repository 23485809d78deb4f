"""The daemon and the service as real processes: pressure in, memory actions out.

Each test starts its own service (they change its state) and runs `autoglm-memd` as a
subprocess, reading its JSON events from stdout and the service's account over the
control socket.
"""

import threading

import psutil
import pytest
from memd_harness import (
    GIB,
    DaemonProcess,
    Service,
    session_ids,
    write_policy,
    write_trace,
)

from autoglm.control.v1 import control_service_pb2 as control_pb
from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.conftest import png_bytes, start_server
from tests.support.polling import wait_until

POLL = "0.2"
ENCODERS = ("vision", "audio")


@pytest.fixture
def server(tiny_bundle, tmp_path):
    process = start_server(tmp_path / "server", tiny_bundle)
    yield process
    process.terminate()


@pytest.fixture
def service(server):
    stubs = Service(server.target, server.control_target)
    yield stubs
    stubs.close()


def daemon_args(server, *extra: str) -> list[str]:
    return ["--control", server.control_target, "--poll-interval", POLL, *extra]


def action_kinds(daemon: DaemonProcess) -> list[tuple[str, str | None]]:
    return [(event["action"], event.get("admission")) for event in daemon.actions()]


def encoders_on(tiers: dict[str, int], tier: int) -> bool:
    return all(tiers[name] == tier for name in ENCODERS)


def test_replayed_pressure_walks_the_ladder_and_back(server, service, tmp_path):
    sessions = service.open_sessions(3)
    assert set(sessions) <= session_ids(service.status())
    # Rows every 0.2 s: calm, above the hard mark for 3.6 s, then below every exit mark.
    trace = write_trace(
        tmp_path / "pressure.jsonl", [(0.2, 0.5), (3.6, 0.95), (3.0, 0.3)], 0.2, 24 * GIB
    )
    config = write_policy(tmp_path / "memd.toml")
    daemon = DaemonProcess(
        daemon_args(server, "--config", str(config), "--probe", "replay", "--trace", str(trace),
                    "--replay-speed", "1")
    )  # fmt: skip
    modes: list[int] = []
    saw_encoders_on_disk = saw_sessions_gone = False
    held: dict[str, object] = {}

    def send_while_paused() -> None:
        held["final"] = service.generate(pb.Part(text="queued while paused"))

    sender = threading.Thread(target=send_while_paused)
    while daemon.process.poll() is None:
        status = service.status()
        if not modes or modes[-1] != status.admission_mode:
            modes.append(status.admission_mode)
        saw_encoders_on_disk |= encoders_on(service.tiers(), control_pb.TIER_DISK)
        saw_sessions_gone |= not set(sessions) & session_ids(status)
        if status.admission_mode == control_pb.ADMISSION_MODE_PAUSED and sender.ident is None:
            sender.start()
    assert daemon.wait_exit() == 0, daemon.tail()
    sender.join(60)

    assert action_kinds(daemon) == [
        ("collect_garbage", None),
        ("trim_kv", None),
        ("offload_encoders", None),
        ("set_admission", "limited"),
        ("set_admission", "paused"),
        ("set_admission", "limited"),
        ("set_admission", "open"),
    ]
    assert {event["result"] for event in daemon.actions()} == {"ok"}
    assert [event["rule"] for event in daemon.actions()][:3] == [
        "hard_mark:collect_garbage",
        "hard_mark:trim_kv",
        "hard_mark:offload_encoders",
    ]
    offload = daemon.actions()[2]
    assert "vision->disk" in offload["detail"] and "audio->disk" in offload["detail"]
    assert saw_sessions_gone and saw_encoders_on_disk
    assert modes[0] == control_pb.ADMISSION_MODE_OPEN
    assert control_pb.ADMISSION_MODE_PAUSED in modes
    assert modes[-1] == control_pb.ADMISSION_MODE_OPEN
    # A request sent while paused is not lost: it completes once admission reopens at the
    # latest. (That it waits at all is the engine's part: see the model loop's admission.)
    assert held["final"].finish_reason == pb.FINISH_REASON_LENGTH

    final = service.status()
    assert not set(sessions) & session_ids(final)
    assert final.admission_mode == control_pb.ADMISSION_MODE_OPEN
    assert encoders_on(service.tiers(), control_pb.TIER_DISK)
    image = service.generate(pb.Part(image=pb.Image(data=png_bytes())), pb.Part(text="what is it"))
    assert image.usage.image_tokens > 0
    tiers = service.tiers()
    assert tiers["vision"] == control_pb.TIER_CPU
    assert tiers["audio"] == control_pb.TIER_DISK


def test_host_probe_acts_on_the_service_rss_over_budget(server, service, tmp_path):
    sessions = service.open_sessions(2)
    rss = psutil.Process(server.pid).memory_info().rss
    budget = int(rss * 0.97)
    config = write_policy(tmp_path / "memd.toml")
    daemon = DaemonProcess(
        daemon_args(server, "--config", str(config), "--probe", "host", "--pid", str(server.pid),
                    "--host-budget-bytes", str(budget))
    )  # fmt: skip
    try:
        daemon.wait_for(lambda: ("set_admission", "paused") in action_kinds(daemon))
        status = service.status()
        rss_after = psutil.Process(server.pid).memory_info().rss
    finally:
        assert daemon.stop() == 0, daemon.tail()

    assert action_kinds(daemon)[:3] == [
        ("collect_garbage", None),
        ("trim_kv", None),
        ("offload_encoders", None),
    ]
    assert {event["result"] for event in daemon.actions()} == {"ok"}
    readings = [event["readings"]["host"] for event in daemon.actions()]
    assert {reading["total_bytes"] for reading in readings} == {budget}
    assert readings[0]["level"] == "hard"
    # The readings are the service process's real RSS, as it and psutil see it.
    low, high = sorted((rss, rss_after))
    for reading in readings:
        assert 0.9 * low <= reading["used_bytes"] <= 1.1 * high
    assert abs(status.process_rss_bytes - rss_after) <= 0.1 * rss_after
    assert not set(sessions) & session_ids(status)
    assert encoders_on(service.tiers(), control_pb.TIER_DISK)
    assert status.admission_mode == control_pb.ADMISSION_MODE_PAUSED


def test_killing_the_daemon_leaves_the_service_serving(server, service, tmp_path):
    config = write_policy(tmp_path / "memd.toml", gc_every_seconds=0.3)
    daemon = DaemonProcess(daemon_args(server, "--config", str(config), "--probe", "host"))
    try:
        daemon.wait_for(
            lambda: any(event["rule"] == "periodic:interval" for event in daemon.actions())
        )
    finally:
        daemon.kill()
    assert daemon.process.returncode < 0
    final = service.generate(pb.Part(text="still there?"))
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    image = service.generate(pb.Part(image=pb.Image(data=png_bytes())), pb.Part(text="and this"))
    assert image.usage.image_tokens > 0
    assert service.status().admission_mode == control_pb.ADMISSION_MODE_OPEN


def test_daemon_reconnects_after_the_service_restarts(tiny_bundle, tmp_path):
    """Watch mode: ticks run on pushed statuses (the host probe learns the service's pid from
    them); after a restart the stream is subscribed again and admission re-applied."""
    workdir = tmp_path / "server"
    first = start_server(workdir, tiny_bundle)
    rss = psutil.Process(first.pid).memory_info().rss
    # Well over budget, so the restarted service is under pressure too; re-send the
    # admission mode at once when the service disagrees.
    config = write_policy(tmp_path / "memd.toml", transition_seconds=60.0)
    daemon = DaemonProcess(
        daemon_args(first, "--config", str(config), "--probe", "host", "--watch",
                    "--host-budget-bytes", str(rss // 2), "--log-level", "debug"),
        env={
            "AUTOGLM_MEMD_POLICY_COOLDOWN_SECONDS_SET_ADMISSION": "0",
            "AUTOGLM_MEMD_CONTROL_WATCH_INTERVAL_SECONDS": "0.2",
        },
    )  # fmt: skip
    second = None
    try:
        daemon.wait_for(lambda: ("set_admission", "paused") in action_kinds(daemon))
        daemon.wait_for(lambda: daemon.named("memd.tick")[-1]["status_from"] == "watch")
        assert first.terminate() == 0
        daemon.wait_for(lambda: daemon.named("memd.service_unavailable"))
        (workdir / "port.json").unlink()  # else start_server reads the old port
        second = start_server(workdir, tiny_bundle)
        ticks_before_serving = len(daemon.named("memd.tick"))
        daemon.wait_for(lambda: daemon.named("memd.service_available"))
        service = Service(second.target, second.control_target)
        try:
            wait_until(
                lambda: service.status().admission_mode == control_pb.ADMISSION_MODE_PAUSED,
                what="the daemon re-applies admission PAUSED on the restarted service",
            )
        finally:
            service.close()
        # The stream to the restarted service is up and its pushes drive the ticks again.
        daemon.wait_for(lambda: daemon.named("memd.tick")[-1]["status_from"] == "watch")
    finally:
        assert daemon.stop() == 0, daemon.tail()
        first.terminate()
        if second is not None:
            second.terminate()

    ticks = daemon.named("memd.tick")
    down = max(i for i, tick in enumerate(ticks) if not tick["service_up"])
    # Back within two polls of the service serving: the poll in flight, then the next.
    assert down <= ticks_before_serving
    assert ticks[down + 1]["service_up"]
    events = daemon.events
    back = next(i for i, e in enumerate(events) if e["event"] == "memd.service_available")
    after = events[back:]
    assert not [e for e in after if e["event"] == "memd.reading_failed"]
    reconcile = [e for e in after if e["event"] == "memd.action" and e["action"] == "set_admission"]
    assert reconcile[0]["rule"] == "reconcile:admission_paused"
    assert reconcile[0]["result"] == "ok"
    # One subscription per service.
    assert len(daemon.named("memd.watch_connected")) == 2
    assert daemon.named("memd.watch_lost")


@pytest.mark.parametrize("given", ["pid", "pid_file"])
def test_host_probe_follows_a_restarted_service_to_its_new_pid(given, tiny_bundle, tmp_path):
    """`--pid` names the first process; once it is gone the daemon reads the restarted one
    (learned from the control API), and so it does from `--pid-file` (the service's port
    file) without any control API. Loss and recovery are logged once, not every tick."""
    workdir = tmp_path / "server"
    first = start_server(workdir, tiny_bundle)
    if given == "pid":
        args = daemon_args(first, "--pid", str(first.pid))
        source = "service"
    else:
        control = f"unix://{tmp_path / 'nobody.sock'}"
        args = ["--control", control, "--poll-interval", POLL,
                "--pid-file", str(workdir / "port.json")]  # fmt: skip
        source = "pid_file"
    config = write_policy(tmp_path / "memd.toml")
    daemon = DaemonProcess(
        [*args, "--config", str(config), "--probe", "host", "--log-level", "debug"]
    )
    second = None

    def found(pid: int) -> list[dict]:
        return [e for e in daemon.named("memd.service_pid_found") if e["pid"] == pid]

    try:
        daemon.wait_for(lambda: found(first.pid))
        assert first.terminate() == 0
        daemon.wait_for(lambda: daemon.named("memd.service_pid_lost"))
        lost_at = len(daemon.events)
        daemon.wait_for(lambda: len(daemon.named("memd.tick")) >= 3 + sum(
            e["event"] == "memd.tick" for e in daemon.events[:lost_at]))  # fmt: skip
        second = start_server(workdir, tiny_bundle)
        daemon.wait_for(lambda: found(second.pid))
        daemon.wait_for(lambda: daemon.named("memd.reading_recovered"))
    finally:
        assert daemon.stop() == 0, daemon.tail()
        first.terminate()
        if second is not None:
            second.terminate()

    assert found(first.pid)[0]["source"] == ("pid" if given == "pid" else "pid_file")
    (lost,) = daemon.named("memd.service_pid_lost")
    assert lost["pid"] == first.pid
    (back,) = found(second.pid)
    assert (back["source"], back["previous"]) == (source, first.pid)
    events = daemon.events
    lost_index, back_index = events.index(lost), events.index(back)
    failing_ticks = [e for e in events[lost_index:back_index] if e["event"] == "memd.tick"]
    failed = daemon.named("memd.reading_failed")
    assert len(failing_ticks) >= 3
    assert 1 <= len(failed) <= 2  # the loss (and perhaps a read racing the exit), once each
    assert all(str(first.pid) in event["error"] for event in failed)
    (recovered,) = daemon.named("memd.reading_recovered")
    assert events.index(recovered) > back_index
