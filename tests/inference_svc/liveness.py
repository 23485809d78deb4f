"""Checks that a server survived what a test sent it: health, a valid Generate, its KV account."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, health_status
from tests.support.polling import wait_until


def memory_status(server: ServerProcess) -> cpb.MemoryStatus:
    with grpc.insecure_channel(server.control_target) as channel:
        stub = cpb_grpc.ControlServiceStub(channel)
        return stub.GetMemoryStatus(cpb.GetMemoryStatusRequest(), timeout=10).status


def running_kv(server: ServerProcess) -> tuple[int, int]:
    """(requests running, KV bytes they hold), from the control account."""
    status = memory_status(server)
    return status.running_requests, sum(r.bytes for r in status.requests)


def wait_for_no_running_kv(server: ServerProcess, timeout: float = 30.0) -> None:
    """Poll until no request runs and none holds KV; fail after `timeout` seconds."""
    wait_until(lambda: running_kv(server) == (0, 0), timeout, "no request running or holding KV")


def small_generate(channel: grpc.Channel, timeout: float = 60.0) -> pb.FinalMessage:
    """A small valid Generate; its final message."""
    stub = pb_grpc.InferenceServiceStub(channel)
    request = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="still there?")])],
        sampling=pb.SamplingParams(max_new_tokens=3),
    )
    responses = list(stub.Generate(request, timeout=timeout))
    assert responses and responses[-1].HasField("final")
    assert responses[-1].final.usage.completion_tokens >= 1
    return responses[-1].final


def assert_still_serving(server: ServerProcess, channel: grpc.Channel) -> None:
    """The process lives, health is SERVING, a valid request succeeds, no KV is left running."""
    assert server.process.poll() is None, "the server exited"
    assert health_status(server.target) == health_pb2.HealthCheckResponse.SERVING
    small_generate(channel)
    wait_for_no_running_kv(server)
