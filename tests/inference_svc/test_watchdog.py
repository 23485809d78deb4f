"""The watchdog: a dead or stalled model loop turns health NOT_SERVING, ends every open
request with UNAVAILABLE and exits non-zero, so a supervisor restarts the service."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from inference_svc.watchdog import EXIT_CODE
from tests.conftest import start_server

SERVING = health_pb2.HealthCheckResponse.SERVING


def request(text: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])],
        sampling=pb.SamplingParams(max_new_tokens=2000, min_new_tokens=2000),
    )


def outcome(stub, text: str, results: dict, started: threading.Event | None = None) -> None:
    call = stub.Generate(request(text), timeout=60)
    try:
        if started is not None:
            next(call)
            started.set()
        list(call)
        results[text] = grpc.StatusCode.OK
    except grpc.RpcError as error:
        results[text] = error.code()


def statuses_until_gone(watch) -> list[int]:
    """Health statuses seen until the first that is not SERVING (or the server is gone)."""
    seen = []
    try:
        for reply in watch:
            seen.append(reply.status)
            if reply.status != SERVING:
                break
    except grpc.RpcError:
        pass
    return seen


@pytest.mark.parametrize("fault,flags", [
    ("KILL-THE-LOOP", ["--watchdog-timeout", "30"]),
    ("STALL-THE-LOOP", ["--watchdog-timeout", "1"]),
])
def test_a_dead_or_stalled_model_loop_is_never_silent(tiny_bundle, tmp_path, fault, flags):
    server = start_server(tmp_path / "s", tiny_bundle, *flags,
                          module="tests.inference_svc.faulty_server")
    results: dict[str, grpc.StatusCode] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="autoglm.inference.v1.InferenceService"))
        assert next(watch).status == SERVING
        running = threading.Event()
        bystander = threading.Thread(target=outcome, args=(stub, "bystander", results, running))
        bystander.start()
        assert running.wait(30)  # a stream is in flight when the fault strikes
        sent = time.monotonic()
        culprit = threading.Thread(target=outcome, args=(stub, fault, results))
        culprit.start()
        statuses = statuses_until_gone(watch)
        noticed = time.monotonic() - sent
        bystander.join(30)
        culprit.join(30)
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert results == {"bystander": grpc.StatusCode.UNAVAILABLE,
                       fault: grpc.StatusCode.UNAVAILABLE}
    assert server.process.wait(30) == EXIT_CODE
    fault_events = [e for e in server.log_lines() if e.get("event") == "model_loop_fault"]
    assert len(fault_events) == 1
    print(f"\n{fault}: health left SERVING {noticed:.2f} s after the faulty request was sent")
