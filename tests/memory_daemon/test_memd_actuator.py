"""The control client against an in-test ControlService on loopback: mapping, retry, reconnect."""

import pytest
from control_double import RecordingControl, start_control

from autoglm.control.v1 import control_service_pb2 as pb
from memory_daemon.actuator import ADMISSION_LEASE_SECONDS, ControlClient
from memory_daemon.config import ControlSection
from memory_daemon.errors import ControlCallError
from memory_daemon.policy import Action, ActionKind, Admission

# The fixture serves in the session loop; the tests must run in the same loop.
pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST = {"backoff_initial_seconds": 0.01, "backoff_max_seconds": 0.02, "deadline_seconds": 2.0}


@pytest.fixture
async def tcp_control():
    servicer = RecordingControl(token="s3cret", pid=4242)
    server, port = await start_control(servicer, "127.0.0.1:0")
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


async def test_actions_map_to_their_rpcs(tcp_control):
    servicer, target = tcp_control
    client = ControlClient(ControlSection(target=target, token="s3cret", **FAST), "disk")
    try:
        status = await client.memory_status()
        gc = await client.execute(Action(ActionKind.COLLECT_GARBAGE, "test"))
        trim = await client.execute(Action(ActionKind.TRIM_KV, "test", target_bytes=5000))
        await client.execute(Action(ActionKind.OFFLOAD_ENCODERS, "test"))
        await client.execute(Action(ActionKind.PREFETCH_ENCODERS, "test"))
        await client.execute(
            Action(ActionKind.SET_ADMISSION, "test", admission=Admission.LIMITED, admission_limit=3)
        )
    finally:
        await client.close()
    assert status.pid == 4242
    assert (gc.freed_bytes, gc.detail) == (123, "gc")
    assert trim.freed_bytes == 5000
    calls = dict(servicer.actions())
    assert calls["TrimKvCache"] == pb.TrimKvCacheRequest(
        policy=pb.TRIM_POLICY_LRU, target_bytes=5000
    )
    assert calls["OffloadModules"] == pb.OffloadModulesRequest(modalities=[], tier=pb.TIER_DISK)
    assert calls["ReloadModules"] == pb.ReloadModulesRequest(modalities=[])
    assert calls["SetAdmission"] == pb.SetAdmissionRequest(
        mode=pb.ADMISSION_MODE_LIMITED, max_running=3, lease_seconds=ADMISSION_LEASE_SECONDS
    )


async def test_transient_failures_are_retried_with_backoff(tcp_control):
    servicer, target = tcp_control
    servicer.fail_next = 2
    client = ControlClient(ControlSection(target=target, token="s3cret", retries=3, **FAST))
    try:
        outcome = await client.execute(Action(ActionKind.COLLECT_GARBAGE, "test"))
    finally:
        await client.close()
    assert outcome.freed_bytes == 123
    assert [name for name, _ in servicer.calls] == ["CollectGarbage"] * 3


async def test_retries_run_out(tcp_control):
    servicer, target = tcp_control
    servicer.fail_next = 10
    client = ControlClient(ControlSection(target=target, token="s3cret", retries=1, **FAST))
    try:
        with pytest.raises(ControlCallError, match="UNAVAILABLE") as raised:
            await client.execute(Action(ActionKind.COLLECT_GARBAGE, "test"))
    finally:
        await client.close()
    assert raised.value.rpc == "CollectGarbage"
    assert len(servicer.calls) == 2


async def test_a_wrong_token_fails_at_once_without_retries(tcp_control):
    servicer, target = tcp_control
    client = ControlClient(ControlSection(target=target, token="wrong", retries=3, **FAST))
    try:
        with pytest.raises(ControlCallError) as raised:
            await client.execute(Action(ActionKind.COLLECT_GARBAGE, "test"))
    finally:
        await client.close()
    assert raised.value.code == "UNAUTHENTICATED"
    assert servicer.calls == []


async def test_reconnects_when_the_service_restarts_on_the_same_socket(tmp_path):
    socket = tmp_path / "control.sock"
    target = f"unix://{socket}"
    client = ControlClient(ControlSection(target=target, retries=5, **FAST))
    first = RecordingControl(pid=1)
    server, _ = await start_control(first, f"unix:{socket}")
    try:
        assert (await client.memory_status()).pid == 1
        await server.stop(None)
        with pytest.raises(ControlCallError, match="UNAVAILABLE"):
            await client.memory_status()
        second = RecordingControl(pid=2)
        server, _ = await start_control(second, f"unix:{socket}")
        await client.execute(Action(ActionKind.COLLECT_GARBAGE, "after restart"))
        assert (await client.memory_status()).pid == 2
        assert second.calls[0][0] == "CollectGarbage"
    finally:
        await client.close()
        await server.stop(None)
