"""TEST DOUBLE: a scripted InferenceService on a loopback port, for gateway tests.

It produces on demand what the real tiny model cannot: reasoning deltas, chosen finish
reasons, RESOURCE_EXHAUSTED with a retry hint, and an endless stream whose cancellation
it records. It runs on a thread-pool gRPC server so that sync and async tests alike can
call the gateway while it answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from gateway.upstream import INFERENCE_SERVICE_NAME

Script = Callable[[pb.GenerateRequest, grpc.ServicerContext, str], Iterator[pb.GenerateResponse]]

REPLY_USAGE = pb.Usage(
    prompt_tokens=11, completion_tokens=5, cached_prompt_tokens=3, reasoning_tokens=2
)


def reply(
    text_pieces: list[str],
    *,
    reasoning_pieces: tuple[str, ...] = (),
    finish_reason: int = pb.FINISH_REASON_STOP,
    usage: pb.Usage = REPLY_USAGE,
) -> Script:
    """Streams reasoning deltas, then text deltas, then the final message."""

    def script(_: pb.GenerateRequest, __: grpc.ServicerContext, request_id: str):
        for piece in reasoning_pieces:
            yield pb.GenerateResponse(reasoning_delta=piece, request_id=request_id)
        for piece in text_pieces:
            yield pb.GenerateResponse(text_delta=piece, request_id=request_id)
        final = pb.FinalMessage(finish_reason=finish_reason, usage=usage)
        yield pb.GenerateResponse(final=final, request_id=request_id)

    return script


def fail(
    code: grpc.StatusCode,
    details: str,
    *,
    trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
    after_pieces: tuple[str, ...] = (),
) -> Script:
    """Optionally streams some text, then ends the call with `code`."""

    def script(_: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str):
        for piece in after_pieces:
            yield pb.GenerateResponse(text_delta=piece, request_id=request_id)
        context.set_trailing_metadata(trailing_metadata)
        context.abort(code, details)

    return script


@dataclass
class FakeInferenceService(pb_grpc.InferenceServiceServicer):
    """Records every Generate call and answers it with the current `script`."""

    script: Script = field(default_factory=lambda: reply(["Hello", ", world"]))
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    endless_stream_ended: threading.Event = field(default_factory=threading.Event)

    def reset(self) -> None:
        self.script = reply(["Hello", ", world"])
        self.requests.clear()
        self.request_ids.clear()
        self.endless_stream_ended.clear()

    def endless(self) -> Script:
        """Streams deltas until the client cancels; the end is recorded in the event."""

        def script(_: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str):
            context.add_callback(self.endless_stream_ended.set)
            while context.is_active():
                yield pb.GenerateResponse(text_delta="tok ", request_id=request_id)
                self.endless_stream_ended.wait(0.01)

        return script

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        metadata = dict(context.invocation_metadata())
        request_id = metadata.get("x-request-id", "fake-request")
        self.requests.append(request)
        self.request_ids.append(request_id)
        yield from self.script(request, context, request_id)


@dataclass
class FakeUpstream:
    """The double and its server; `target` is what the gateway dials."""

    service: FakeInferenceService
    health: health.HealthServicer
    server: grpc.Server
    target: str

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set(INFERENCE_SERVICE_NAME, status)


def start_fake_upstream() -> FakeUpstream:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    service = FakeInferenceService()
    health_servicer = health.HealthServicer()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    upstream = FakeUpstream(service, health_servicer, server, f"127.0.0.1:{port}")
    upstream.set_serving(True)
    return upstream
