"""TLS, mTLS and connection limits on real servers: the public port and the TCP control port,
reached by real channels and by every client that can speak TLS."""

from __future__ import annotations

import socket

import grpc
import pytest
from autoglm_client import (
    AuthError,
    ControlClient,
    InferenceClient,
    UnavailableError,
    tls_credentials,
)
from autoglm_client.cli import main as autoglm
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from gateway.config import GatewayConfig
from gateway.upstream import InferenceUpstream
from memory_daemon.actuator import ControlClient as DaemonControlClient
from memory_daemon.config import ControlSection
from tests.conftest import health_status, start_server

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "s3cret"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def short_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Hello")])],
        sampling=pb.SamplingParams(max_new_tokens=4, seed=1),
    )


@pytest.fixture(scope="module")
def control_tcp() -> str:
    """Where tls_server listens for the control API over TCP."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def tls_server(tiny_bundle, pki, control_tcp, tmp_path_factory):
    """TLS on the public port; control on TCP with the same certificate, mTLS and a token."""
    server = start_server(
        tmp_path_factory.mktemp("tls"), tiny_bundle, *pki.server_args(),
        "--control-tcp", control_tcp, "--control-token", TOKEN,
        "--control-tls-client-ca", str(pki.ca),
        credentials=pki.credentials(),
    )
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle, pki, tmp_path_factory):
    """Client certificates required on the public port; two streams per connection."""
    server = start_server(
        tmp_path_factory.mktemp("mtls"), tiny_bundle, *pki.server_args(),
        "--tls-client-ca", str(pki.ca), "--max-concurrent-streams", "2",
        credentials=pki.credentials(with_client_cert=True),
    )
    yield server
    server.terminate()


def test_a_client_trusting_the_ca_is_served(tls_server, pki):
    assert health_status(tls_server.target, credentials=pki.credentials()) == SERVING
    with grpc.secure_channel(tls_server.target, pki.credentials()) as channel:
        responses = list(pb_grpc.InferenceServiceStub(channel).Generate(short_request()))
    assert responses[-1].final.usage.completion_tokens == 4


def test_a_plaintext_client_is_not_served(tls_server):
    with grpc.insecure_channel(tls_server.target) as channel, \
            pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_python_client_and_cli_take_the_ca(tls_server, pki, capsys):
    with InferenceClient(tls_server.target, credentials=tls_credentials(pki.ca)) as client:
        assert client.model_info().name == "autoglm-phone-9b"
    assert autoglm(["info", "--target", tls_server.target, "--tls-ca", str(pki.ca)]) == 0
    assert "autoglm-phone-9b" in capsys.readouterr().out


async def test_the_gateway_reaches_the_service_over_tls(tls_server, pki):
    upstream = InferenceUpstream(GatewayConfig(upstream_target=tls_server.target,
                                               upstream_tls_ca=pki.ca))
    await upstream.open()
    try:
        assert await upstream.serving_status() == "SERVING"
    finally:
        await upstream.close()


def test_control_over_tcp_wants_tls_a_client_certificate_and_the_token(
    tls_server, control_tcp, pki
):
    mtls = tls_credentials(pki.ca, pki.client_cert, pki.client_key)
    with ControlClient(control_tcp, token=TOKEN, credentials=mtls) as control:
        assert control.memory_status().pid == tls_server.pid
    with ControlClient(control_tcp, token=TOKEN,
                       credentials=tls_credentials(pki.ca)) as control, \
            pytest.raises(UnavailableError):
        control.memory_status()
    with ControlClient(control_tcp, token="wrong", credentials=mtls) as control, \
            pytest.raises(AuthError):
        control.memory_status()


def test_autoglm_status_reaches_the_tls_control_port(tls_server, control_tcp, pki, capsys):
    code = autoglm([
        "status", "--control", control_tcp, "--token", TOKEN, "--json",
        "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
        "--tls-key", str(pki.client_key),
    ])
    assert code == 0
    assert f'"pid": {tls_server.pid}' in capsys.readouterr().out


async def test_the_memory_daemon_reaches_the_tls_control_port(tls_server, control_tcp, pki):
    section = ControlSection(
        target=control_tcp, token=TOKEN, tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert), tls_key=str(pki.client_key),
    )
    client = DaemonControlClient(section)
    try:
        assert (await client.memory_status()).pid == tls_server.pid
    finally:
        await client.close()


def test_mtls_serves_only_clients_with_a_certificate(mtls_server, pki):
    with grpc.secure_channel(mtls_server.target, pki.credentials()) as channel, \
            pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    credentials = pki.credentials(with_client_cert=True)
    with grpc.secure_channel(mtls_server.target, credentials) as channel:
        responses = list(pb_grpc.InferenceServiceStub(channel).Generate(short_request()))
    assert responses[-1].HasField("final")


def test_a_stream_over_the_per_connection_limit_waits_for_a_free_one(mtls_server, pki):
    credentials = pki.credentials(with_client_cert=True)
    request = health_pb2.HealthCheckRequest()
    events: list[str] = []
    with grpc.secure_channel(mtls_server.target, credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        first, second = health.Watch(request), health.Watch(request)
        assert next(first).status == next(second).status == SERVING  # both streams are open
        third = health.Check.future(request, timeout=60)
        third.add_done_callback(lambda _: events.append("third answered"))
        # A call on a connection of its own, sent after the third, is answered meanwhile.
        own = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(mtls_server.target, credentials, options=own) as other:
            health_pb2_grpc.HealthStub(other).Check(request, timeout=10)
        events.append("other connection answered")
        events.append("first cancelled")
        first.cancel()
        assert third.result().status == SERVING
        second.cancel()
    assert events == ["other connection answered", "first cancelled", "third answered"]


def test_tcp_control_without_tls_is_refused_unless_insecure_is_explicit(tiny_bundle, tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, "--control-tcp", "127.0.0.1:0",
                          "--control-token", TOKEN, wait=False)
    assert server.process.wait(60) == 2
    log = server.log_path.read_text()
    assert "needs TLS" in log and "--control-insecure" in log


def test_a_client_pinging_too_often_is_sent_away(mtls_server, pki):
    aggressive = [
        ("grpc.keepalive_time_ms", 100),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    credentials = pki.credentials(with_client_cert=True)
    with grpc.secure_channel(mtls_server.target, credentials, options=aggressive) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(),
                                                          timeout=60)
        assert next(watch).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            next(watch)  # no data will come: only the server's GOAWAY ends this stream
    # GOAWAY ENHANCE_YOUR_CALM "too_many_pings", after --max-ping-strikes pings closer
    # together than --min-ping-interval
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "too many pings" in info.value.details().lower()
