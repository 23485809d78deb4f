"""Control client against the fake control servicer (see conftest.py)."""

import pytest
from autoglm_client import AuthError, ControlClient, InputError
from client_fakes import CONTROL_TOKEN, FakeControlServicer

from autoglm.control.v1 import control_service_pb2 as cpb
from tests.support.fake_inference import FakeUpstream


def test_memory_status_with_token(fake_server: FakeUpstream, fake_control: FakeControlServicer):
    with ControlClient(fake_server.target, token=CONTROL_TOKEN) as client:
        status = client.memory_status()
    assert status.pid == 4242
    assert status.sessions[0].session_id == "会话-1"


def test_missing_token_is_an_auth_error(
    fake_server: FakeUpstream, fake_control: FakeControlServicer
):
    with ControlClient(fake_server.target) as client, pytest.raises(AuthError):
        client.memory_status()


def test_watch_yields_each_push(fake_server: FakeUpstream, fake_control: FakeControlServicer):
    with ControlClient(fake_server.target, token=CONTROL_TOKEN) as client:
        running = [status.running_requests for status in client.watch(0.1)]
    assert running == [0, 1, 2]


def test_actions_translate_names_to_enums(
    fake_server: FakeUpstream, fake_control: FakeControlServicer
):
    with ControlClient(fake_server.target, token=CONTROL_TOKEN) as client:
        offloaded = client.offload(["image"], tier="disk")
        admission = client.set_admission("limited", max_running=3)
    assert offloaded.result.detail == "image -> TIER_DISK"
    assert fake_control.state.admission == cpb.SetAdmissionRequest(
        mode=cpb.ADMISSION_MODE_LIMITED, max_running=3
    )
    assert admission.max_running == 3


def test_unknown_names_are_rejected_before_sending(
    fake_server: FakeUpstream, fake_control: FakeControlServicer
):
    with ControlClient(fake_server.target, token=CONTROL_TOKEN) as client:
        with pytest.raises(InputError, match="admission mode"):
            client.set_admission("closed")  # type: ignore[arg-type]
        with pytest.raises(InputError, match="tier"):
            client.offload(tier="vram")  # type: ignore[arg-type]
    assert fake_control.state.admission is None
