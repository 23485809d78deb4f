"""The control API against a real server: account, actions, admission, auth, telemetry."""

from __future__ import annotations

import threading

import grpc
import pytest

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cgrpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.conftest import ServerProcess, png_bytes, start_server
from tests.support.polling import wait_until


@pytest.fixture(scope="module")
def server(own_server: ServerProcess) -> ServerProcess:
    """A server of this module's own: its tests change admission and module residency."""
    return own_server


def image_request(tokens: int = 4) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(text="what is this"),
            pb.Part(image=pb.Image(data=png_bytes(), mime_type="image/png"))])],
        sampling=pb.SamplingParams(max_new_tokens=tokens, temperature=0, seed=3))


def status(control) -> cpb.MemoryStatus:
    return control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status


def model_loop_went_round(control) -> None:
    """Return once the model loop has been round at least once since the call: TrimKvCache
    runs between two loop steps, so the second of two has a full step before it."""
    for _ in range(2):
        control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_LRU,
                                                   target_bytes=2**62))  # frees nothing


def tiers(control) -> dict[str, int]:
    return {m.name: m.tier for m in status(control).modules}


def test_status_accounts_for_weights_process_and_pid(control, server):
    now = status(control)
    assert now.pid == server.pid
    assert now.process_rss_bytes > 0
    cpu = next(d for d in now.devices if d.device == "cpu")
    assert cpu.weight_bytes == sum(m.weight_bytes for m in now.modules)
    assert {m.name: m.modality for m in now.modules} == {
        "decoder": "text", "vision": "image", "audio": "audio"}
    assert now.admission_mode == cpb.ADMISSION_MODE_OPEN


def test_offload_to_disk_then_an_image_request_reloads_with_the_same_output(control, stub):
    before = "".join(r.text_delta for r in stub.Generate(image_request(8)))
    reply = control.OffloadModules(cpb.OffloadModulesRequest(modalities=["image", "audio"],
                                                             tier=cpb.TIER_DISK))
    assert {m.name: m.tier for m in reply.modules}["vision"] == cpb.TIER_DISK
    assert {m.name: m.weight_bytes for m in reply.modules}["vision"] == 0
    assert reply.result.duration_seconds > 0
    assert "vision->disk" in reply.result.detail
    again = control.OffloadModules(cpb.OffloadModulesRequest(modalities=["image"],
                                                             tier=cpb.TIER_DISK))
    assert again.result.detail == "nothing to move"  # idempotent
    control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
    after = "".join(r.text_delta for r in stub.Generate(image_request(8)))
    assert after == before
    assert tiers(control)["vision"] == cpb.TIER_CPU
    assert tiers(control)["audio"] == cpb.TIER_DISK  # not used, so not reloaded
    control.ReloadModules(cpb.ReloadModulesRequest())
    assert tiers(control)["audio"] == cpb.TIER_CPU


def test_offload_with_no_modalities_skips_encoders_in_use(control, stub):
    call = stub.Generate(pb.GenerateRequest(
        messages=image_request().messages,
        sampling=pb.SamplingParams(max_new_tokens=600, min_new_tokens=600)))
    next(call)
    assert "image" in status(control).modalities_in_use
    reply = control.OffloadModules(cpb.OffloadModulesRequest())
    states = {m.name: m.tier for m in reply.modules}
    assert states["vision"] == cpb.TIER_CPU
    assert states["audio"] == cpb.TIER_DISK
    call.cancel()
    control.ReloadModules(cpb.ReloadModulesRequest())


def test_paused_admission_holds_new_requests_until_reopened(control, stub):
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_PAUSED))
    results: list[pb.FinalMessage] = []
    worker = threading.Thread(target=lambda: results.append(
        list(stub.Generate(image_request()))[-1].final))
    worker.start()
    wait_until(lambda: status(control).queued_requests == 1, 30, "the request queued")
    model_loop_went_round(control)  # it had its chance to admit the request, and did not
    held = status(control)
    assert held.admission_mode == cpb.ADMISSION_MODE_PAUSED
    assert held.queued_requests == 1 and held.running_requests == 0
    assert not results
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_OPEN))
    worker.join(30)
    assert results and results[0].usage.completion_tokens == 4


def test_a_restriction_with_a_lease_lapses_back_to_open(control):
    reply = control.SetAdmission(cpb.SetAdmissionRequest(
        mode=cpb.ADMISSION_MODE_LIMITED, max_running=1, lease_seconds=0.3))
    assert reply.lease_seconds == pytest.approx(0.3)
    assert status(control).admission_mode == cpb.ADMISSION_MODE_LIMITED
    wait_until(lambda: status(control).admission_mode == cpb.ADMISSION_MODE_OPEN, 30,
               "admission open again")


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.SetAdmission(cpb.SetAdmissionRequest()), "mode"),
        (lambda c: c.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_LIMITED)),
         "max_running"),
        (lambda c: c.OffloadModules(cpb.OffloadModulesRequest(modalities=["smell"])), "smell"),
        (lambda c: c.OffloadModules(cpb.OffloadModulesRequest(tier=cpb.TIER_GPU)), "tier"),
        (lambda c: c.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_TRUNCATE)),
         "max_tokens"),
    ],
)
def test_invalid_control_calls_are_invalid_argument(control, call, fragment):
    with pytest.raises(grpc.RpcError) as info:
        call(control)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in info.value.details()


def test_trim_lru_frees_the_oldest_sessions_first(control, stub):
    control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
    for name in ("old", "mid", "new"):
        list(stub.Generate(pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=f"{name} " * 40)])],
            session_id=name, sampling=pb.SamplingParams(max_new_tokens=2))))
    sizes = {s.session_id: s.bytes for s in status(control).sessions}
    reply = control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_LRU,
                                                       target_bytes=sizes["old"]))
    assert list(reply.sessions) == ["old"]
    assert {s.session_id for s in status(control).sessions} == {"mid", "new"}
    truncated = control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_TRUNCATE,
                                                           max_tokens=8))
    assert set(truncated.sessions) == {"mid", "new"}
    assert all(s.tokens == 8 for s in status(control).sessions)


def test_collect_garbage_reports_its_duration(control):
    reply = control.CollectGarbage(cpb.CollectGarbageRequest())
    assert reply.result.duration_seconds > 0
    assert "cpu" in reply.result.freed_bytes_by_device


def test_watch_memory_pushes_the_account_repeatedly(control):
    stream = control.WatchMemory(cpb.WatchMemoryRequest(interval_seconds=0.05))
    pushes = [next(stream).status for _ in range(3)]
    stream.cancel()
    stamps = [p.taken_at.ToNanoseconds() for p in pushes]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3


def test_tcp_control_listener_requires_the_token(tiny_bundle, tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start_server(tmp_path / "s", tiny_bundle, "--control-tcp", f"127.0.0.1:{port}",
                          "--control-token", "s3cret", "--control-insecure")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            control = cgrpc.ControlServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                control.GetMemoryStatus(cpb.GetMemoryStatusRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = control.GetMemoryStatus(cpb.GetMemoryStatusRequest(),
                                         metadata=[("authorization", "Bearer s3cret")])
            assert ok.status.pid == server.pid
    finally:
        server.terminate()


def test_tcp_control_without_a_token_is_refused_at_startup(tiny_bundle, tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, "--control-tcp", "127.0.0.1:0",
                          wait=False)
    assert server.process.wait(60) == 2
    assert "control-token" in server.log_path.read_text()


def test_watch_pushes_right_after_an_action_not_only_on_the_interval(control):
    stream = control.WatchMemory(cpb.WatchMemoryRequest(interval_seconds=30))
    first = next(stream).status
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_LIMITED,
                                                 max_running=2))
    pushed = next(stream).status  # well before the 30 s interval
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_OPEN))
    stream.cancel()
    assert first.admission_mode == cpb.ADMISSION_MODE_OPEN
    assert pushed.admission_mode == cpb.ADMISSION_MODE_LIMITED


def test_watch_streams_end_when_the_service_shuts_down(tiny_bundle, tmp_path):
    import signal

    # a stream held open for the grace period would keep the server up for ten minutes
    server = start_server(tmp_path / "s", tiny_bundle, "--grace-period", "600")
    with grpc.insecure_channel(server.control_target) as channel:
        stream = cgrpc.ControlServiceStub(channel).WatchMemory(
            cpb.WatchMemoryRequest(interval_seconds=0.2))
        next(stream)
        server.process.send_signal(signal.SIGTERM)
        for _ in stream:
            pass
        assert server.process.wait(60) == 0


def test_the_account_lists_the_last_actions_newest_first(control):
    control.CollectGarbage(cpb.CollectGarbageRequest())
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_OPEN))
    recent = status(control).recent_actions
    assert [a.action for a in recent[:2]] == ["SetAdmission", "CollectGarbage"]
    assert recent[1].result.duration_seconds > 0


def test_the_status_command_shows_devices_modules_kv_and_last_actions(server, control):
    import subprocess
    import sys
    from pathlib import Path

    control.CollectGarbage(cpb.CollectGarbageRequest())
    autoglm = Path(sys.executable).parent / "autoglm"
    out = subprocess.run([str(autoglm), "status", "--control", server.control_target],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    for heading in ("Devices", "Modules", "KV of idle sessions", "Last control actions"):
        assert heading in out
    assert "CollectGarbage" in out and "vision" in out
