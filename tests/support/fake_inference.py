"""TEST DOUBLE: a scripted InferenceService on a loopback port, for the client and gateway
tests (the real server is exercised everywhere else, through tests/conftest.py).

It produces on demand what the real tiny model cannot: reasoning deltas, chosen finish
reasons, RESOURCE_EXHAUSTED with a retry hint, a stream without a final message, and an
endless stream whose end it records. Each Generate call is recorded and answered by the
current `script`; a GenerateLive call, once its `end` came, is a Generate call of its
start's request with the speech as the last user part (as the service joins it). It runs
on a thread-pool gRPC server so that sync and async tests alike can call it (or a gateway
in front of it) while it answers.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc

Script = Callable[[pb.GenerateRequest, grpc.ServicerContext, str], Iterator[pb.GenerateResponse]]

INFERENCE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_REQUEST_ID = "fake-request"  # a call's request id when it sent no x-request-id
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the real server's limit is lower; clients test theirs
REPLY_USAGE = pb.Usage(
    prompt_tokens=11, completion_tokens=5, cached_prompt_tokens=3, reasoning_tokens=2
)


def reply(
    text_pieces: list[str],
    *,
    reasoning_pieces: tuple[str, ...] = (),
    finish_reason: int = pb.FINISH_REASON_STOP,
    usage: pb.Usage = REPLY_USAGE,
    final: bool = True,
) -> Script:
    """Streams reasoning deltas, then text deltas, then (unless `final` is False, which
    breaks the contract) the final message."""

    def script(_: pb.GenerateRequest, __: grpc.ServicerContext, request_id: str):
        for piece in reasoning_pieces:
            yield pb.GenerateResponse(reasoning_delta=piece, request_id=request_id)
        for piece in text_pieces:
            yield pb.GenerateResponse(text_delta=piece, request_id=request_id)
        if final:
            message = pb.FinalMessage(finish_reason=finish_reason, usage=usage)
            yield pb.GenerateResponse(final=message, request_id=request_id)

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


def echo(request: pb.GenerateRequest, _: grpc.ServicerContext, request_id: str):
    """Answers "echo: " and the prompt (after a reasoning delta when reasoning is asked
    for); its usage counts a token per prompt character and four per image."""
    if request.return_reasoning:
        yield pb.GenerateResponse(reasoning_delta="思考中", request_id=request_id)
    yield pb.GenerateResponse(text_delta="echo: ", request_id=request_id)
    yield pb.GenerateResponse(text_delta=prompt_of(request), request_id=request_id)
    images = images_of(request)
    final = pb.FinalMessage(
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(
            prompt_tokens=len(prompt_of(request)) + 4 * len(images),
            completion_tokens=2,
            image_tokens=4 * len(images),
        ),
        images=[pb.ImageInfo(width=224, height=224, original_width=1, original_height=1)]
        * len(images),
    )
    yield pb.GenerateResponse(request_id=request_id, final=final)


def prompt_of(request: pb.GenerateRequest | pb.CountTokensRequest) -> str:
    return "".join(part.text for message in request.messages for part in message.parts)


def audio_of(request: pb.GenerateRequest) -> list[bytes]:
    """The PCM of each audio part, in order."""
    return [part.audio.pcm.data for message in request.messages for part in message.parts
            if part.HasField("audio")]


def images_of(request: pb.GenerateRequest | pb.CountTokensRequest) -> list[pb.Image]:
    return [part.image for message in request.messages for part in message.parts
            if part.HasField("image")]


def _default_script() -> Script:
    return reply(["Hello", ", world"])


@dataclass
class FakeInferenceService(pb_grpc.InferenceServiceServicer):
    """Records every Generate call and answers it with the current `script`."""

    script: Script = field(default_factory=_default_script)
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    endless_stream_ended: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def reset(self, script: Script | None = None) -> None:
        self.script = script or _default_script()
        self.requests.clear()
        self.request_ids.clear()
        self.endless_stream_ended.clear()
        self.released.clear()

    def endless(self, piece: str = "tok ") -> Script:
        """Streams `piece` until the call ends (cancelled, past its deadline); the end is
        recorded in `endless_stream_ended`."""

        def script(_: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str):
            # registered before the first message, so that an early end cannot be missed
            if not context.add_callback(self.endless_stream_ended.set):
                self.endless_stream_ended.set()
            while context.is_active():
                yield pb.GenerateResponse(text_delta=piece, request_id=request_id)
                self.endless_stream_ended.wait(0.01)

        return script

    def gated(self, first: str, second: str, timeout: float = 10.0) -> Script:
        """Streams `first`, waits until the test sets `released`, then `second` and a final
        message; fails the call if the test never does."""

        def script(request: pb.GenerateRequest, context: grpc.ServicerContext, request_id: str):
            yield pb.GenerateResponse(text_delta=first, request_id=request_id)
            if not self.released.wait(timeout):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the test never released")
            yield from reply([second])(request, context, request_id)

        return script

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        metadata = dict(context.invocation_metadata())
        request_id = metadata.get("x-request-id", DEFAULT_REQUEST_ID)
        self.requests.append(request)
        self.request_ids.append(request_id)
        if not request.messages:
            context.abort_with_status(
                rpc_status.to_status(_bad_request("messages", "at least one message is needed"))
            )
        yield from self.script(request, context, request_id)

    def GenerateLive(self, requests: Iterator[pb.GenerateLiveRequest],
                     context: grpc.ServicerContext):
        pcm = bytearray()
        try:
            start = next(requests).start
            for message in requests:
                if message.HasField("end"):
                    break
                pcm += message.audio.data
            else:
                return  # the client left (cancelled the call) before its end
        except (StopIteration, grpc.RpcError):
            return
        request = pb.GenerateRequest()
        request.CopyFrom(start.request)
        speech = pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(
            data=bytes(pcm), sample_rate_hz=start.format.sample_rate_hz,
            encoding=start.format.encoding, channels=1)))
        if request.messages and request.messages[-1].role == pb.ROLE_USER:
            request.messages[-1].parts.append(speech)
        else:
            request.messages.append(pb.Message(role=pb.ROLE_USER, parts=[speech]))
        yield from self.Generate(request, context)

    def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(
            name="fake-autoglm",
            context_length=2048,
            modalities=["text", "image", "audio"],
            default_sampling=pb.SamplingParams(max_new_tokens=256, temperature=0.7),
            modules=[
                pb.ModuleInfo(name="decoder", architecture="LlamaForCausalLM",
                              parameters=134_515_008, trained=True, tier=pb.TIER_CPU,
                              device="cpu", weight_bytes=269_030_016,
                              note="SmolLM2-135M-Instruct"),
                pb.ModuleInfo(name="vision", architecture="ViTModel", parameters=5_717_416,
                              trained=False, tier=pb.TIER_DISK, note="seeded random weights"),
            ],
        )

    def CountTokens(self, request, context):
        images = len(images_of(request))
        return pb.CountTokensResponse(
            prompt_tokens=len(prompt_of(request)) + 4 * images, image_tokens=4 * images
        )

    def EndSession(self, request, context):
        if request.session_id == "unknown":
            context.abort(grpc.StatusCode.NOT_FOUND, "no session 'unknown'")
        return pb.EndSessionResponse(freed_bytes=4096)


def _bad_request(field_name: str, description: str) -> status_pb2.Status:
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=field_name, description=description
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)))
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message=description, details=[detail, retry]
    )


@dataclass
class FakeUpstream:
    """The double and its server; `target` is what a client or gateway dials."""

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


def start_fake_upstream(
    control: cpb_grpc.ControlServiceServicer | None = None,
) -> FakeUpstream:
    """Serve the double (and a control double, if given) on a loopback port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
    )
    service = FakeInferenceService()
    health_servicer = health.HealthServicer()
    pb_grpc.add_InferenceServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if control is not None:
        cpb_grpc.add_ControlServiceServicer_to_server(control, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    upstream = FakeUpstream(service, health_servicer, server, f"127.0.0.1:{port}")
    upstream.set_serving(True)
    return upstream
