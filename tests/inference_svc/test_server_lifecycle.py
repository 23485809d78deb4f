"""Health transitions, reflection, graceful shutdown and the control socket's mode."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import start_server, text_request
from tests.support.polling import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def long_request() -> pb.GenerateRequest:
    return text_request("go", max_new_tokens=30000, min_new_tokens=30000)


def short_request() -> pb.GenerateRequest:
    return text_request("go", max_new_tokens=1)


def test_health_goes_serving_after_load_and_not_serving_on_sigterm(tiny_bundle, tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, wait=False)
    port_file = tmp_path / "s" / "port.json"
    wait_until(port_file.exists, 120, "the port file", interval=0.01)
    server.port = json.loads(port_file.read_text())["port"]
    seen: list[int] = []
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        for reply in watch:
            seen.append(reply.status)
            if reply.status == SERVING:
                break
        server.process.send_signal(signal.SIGTERM)
        for reply in watch:
            seen.append(reply.status)
            if reply.status != SERVING:
                break
    assert seen[0] == NOT_SERVING or json.loads(port_file.read_text())["serving"]
    assert SERVING in seen
    assert seen[-1] in (NOT_SERVING, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
    assert server.process.wait(30) == 0


def test_sigterm_ends_a_stream_past_the_grace_period_with_a_cancelled_final(tiny_bundle,
                                                                             tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, "--grace-period", "1")
    with grpc.insecure_channel(server.target) as channel:
        call = pb_grpc.InferenceServiceStub(channel).Generate(long_request())
        next(call)
        server.process.send_signal(signal.SIGTERM)
        rest = list(call)  # ends normally: no RpcError
        assert call.code() == grpc.StatusCode.OK
        final = rest[-1]
        assert final.HasField("final")
        assert final.final.finish_reason == pb.FINISH_REASON_CANCELLED
        assert final.final.usage.prompt_tokens > 0
        assert final.final.usage.completion_tokens >= len(rest) - 1
        assert server.process.wait(30) == 0
    events = [e["event"] for e in server.log_lines()]
    assert "shutting_down" in events and events[-1] == "stopped"
    finished = [e for e in server.log_lines() if e.get("event") == "generation_finished"]
    assert finished[-1]["finish_reason"] == "cancelled"


SERVED_BUT_CUT = (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_new_calls_are_refused_once_shutting_down(tiny_bundle, tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, "--grace-period", "3")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        running = stub.Generate(long_request())
        next(running)
        server.process.send_signal(signal.SIGTERM)

        def refusal() -> grpc.StatusCode | None:
            """How a new (short) call ends: None while it is still served. A call accepted
            just before the shutdown began is served: on a loaded machine it may outlast
            its deadline or the grace period (then it is cancelled with the other open
            streams): None too."""
            try:
                list(stub.Generate(short_request(), timeout=5))
            except grpc.RpcError as error:
                return None if error.code() in SERVED_BUT_CUT else error.code()
            return None

        # until SIGTERM is handled new calls are still served; then every one is refused
        assert wait_until(refusal, 30, "a new call refused") == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(long_request(), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        running.cancel()
    assert server.process.wait(30) == 0


def reflection_call(target: str, request: reflection_pb2.ServerReflectionRequest):
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        return next(stub.ServerReflectionInfo(iter([request])))


def test_reflection_lists_services_and_serves_documented_descriptors(inference_server):
    listed = reflection_call(inference_server.target,
                             reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {"autoglm.inference.v1.InferenceService", "grpc.health.v1.Health",
                     "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection"}
    found = reflection_call(inference_server.target, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="autoglm.inference.v1.GenerateRequest"))
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in found.file_descriptor_response.file_descriptor_proto]
    inference = next(f for f in files if f.package == "autoglm.inference.v1")
    comments = [loc.leading_comments for loc in inference.source_code_info.location]
    assert any("Request for Generate." in c for c in comments)


def test_control_api_is_not_on_the_public_port(inference_server):
    listed = reflection_call(inference_server.target,
                             reflection_pb2.ServerReflectionRequest(list_services=""))
    assert "autoglm.control.v1.ControlService" not in {
        s.name for s in listed.list_services_response.service}
    mode = stat.S_IMODE(os.stat(inference_server.control_socket).st_mode)
    assert mode == 0o600


def test_health_is_serving_for_the_named_service(inference_server):
    with grpc.insecure_channel(inference_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(
            service="autoglm.inference.v1.InferenceService"))
        assert reply.status == SERVING


def test_server_keeps_serving_while_many_clients_misbehave(inference_server):
    errors: list[grpc.StatusCode] = []

    def hostile() -> None:
        with grpc.insecure_channel(inference_server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            call = stub.Generate(long_request(), timeout=0.3)
            try:
                list(call)
            except grpc.RpcError as error:
                errors.append(error.code())

    threads = [threading.Thread(target=hostile) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(errors) == {grpc.StatusCode.DEADLINE_EXCEEDED}
    with grpc.insecure_channel(inference_server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        final = list(stub.Generate(pb.GenerateRequest(
            messages=long_request().messages, sampling=pb.SamplingParams(max_new_tokens=3))))[-1]
    assert final.final.usage.completion_tokens == 3


