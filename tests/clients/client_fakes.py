"""Test doubles for the client tests: a fake inference servicer and a fake control servicer
for a loopback server. They follow the .proto contracts but run no model; the real server is
exercised by test_end_to_end.py through the shared `inference_server` fixture.
"""

from __future__ import annotations

import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc

CONTROL_TOKEN = "s3cret"
BIG_REPLY_BYTES = 5 * 1024 * 1024  # beyond grpc's default 4 MiB receive limit
RELEASE_WAIT_S = 10.0


@dataclass
class FakeState:
    """What the fake servers saw, and the knobs tests turn."""

    generate_requests: list[pb.GenerateRequest] = field(default_factory=list)
    request_ids: list[str | None] = field(default_factory=list)
    release_second_delta: threading.Event = field(default_factory=threading.Event)
    released_by_test: bool | None = None
    stream_cancelled: threading.Event = field(default_factory=threading.Event)
    admission: cpb.SetAdmissionRequest | None = None


@dataclass
class FakeServer:
    """Where the fakes listen and what they saw."""

    target: str
    state: FakeState


def _prompt_of(request: pb.GenerateRequest | pb.CountTokensRequest) -> str:
    return "".join(part.text for message in request.messages for part in message.parts)


def _images_of(request: pb.GenerateRequest | pb.CountTokensRequest) -> list[pb.Image]:
    return [
        part.image
        for message in request.messages
        for part in message.parts
        if part.HasField("image")
    ]


class FakeInferenceServicer(pb_grpc.InferenceServiceServicer):
    """Echoes the prompt back. Magic prompts trigger the behaviours the tests need."""

    def __init__(self, fake: FakeServer) -> None:
        self._fake = fake

    @property
    def state(self) -> FakeState:
        return self._fake.state

    def Generate(self, request, context):
        self.state.generate_requests.append(request)
        self.state.request_ids.append(dict(context.invocation_metadata()).get("x-request-id"))
        if not request.messages:
            context.abort_with_status(
                rpc_status.to_status(_bad_request("messages", "at least one message is needed"))
            )
        prompt = _prompt_of(request)
        if prompt == "exhausted":
            context.set_trailing_metadata((("retry-after-ms", "1500"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget full")
        request_id = "req-fake-1"
        if prompt == "gated":
            yield pb.GenerateResponse(text_delta="你好", request_id=request_id)
            self.state.released_by_test = self.state.release_second_delta.wait(RELEASE_WAIT_S)
            yield pb.GenerateResponse(text_delta="世界", request_id=request_id)
        elif prompt == "hang":
            # Registered before the first message so that an early cancel cannot be missed.
            if not context.add_callback(self.state.stream_cancelled.set):
                self.state.stream_cancelled.set()
            yield pb.GenerateResponse(text_delta="…", request_id=request_id)
            self.state.stream_cancelled.wait(RELEASE_WAIT_S)
            return
        elif prompt == "no-final":
            yield pb.GenerateResponse(text_delta="half", request_id=request_id)
            return
        elif prompt == "big":
            yield pb.GenerateResponse(text_delta="x" * BIG_REPLY_BYTES, request_id=request_id)
        else:
            if request.return_reasoning:
                yield pb.GenerateResponse(reasoning_delta="思考中", request_id=request_id)
            yield pb.GenerateResponse(text_delta="echo: ", request_id=request_id)
            yield pb.GenerateResponse(text_delta=prompt, request_id=request_id)
        yield pb.GenerateResponse(request_id=request_id, final=_final_for(request))

    def GetModelInfo(self, request, context):
        return pb.GetModelInfoResponse(
            name="fake-autoglm",
            context_length=2048,
            modalities=["text", "image", "audio"],
            default_sampling=pb.SamplingParams(max_new_tokens=256, temperature=0.7),
            modules=[
                pb.ModuleInfo(
                    name="decoder",
                    architecture="LlamaForCausalLM",
                    parameters=134_515_008,
                    trained=True,
                    tier=pb.TIER_CPU,
                    device="cpu",
                    weight_bytes=269_030_016,
                    note="SmolLM2-135M-Instruct",
                ),
                pb.ModuleInfo(
                    name="vision",
                    architecture="ViTModel",
                    parameters=5_717_416,
                    trained=False,
                    tier=pb.TIER_DISK,
                    note="seeded random weights",
                ),
            ],
        )

    def CountTokens(self, request, context):
        images = len(_images_of(request))
        return pb.CountTokensResponse(
            prompt_tokens=len(_prompt_of(request)) + 4 * images, image_tokens=4 * images
        )

    def EndSession(self, request, context):
        if request.session_id == "unknown":
            context.abort(grpc.StatusCode.NOT_FOUND, "no session 'unknown'")
        return pb.EndSessionResponse(freed_bytes=4096)


def _final_for(request: pb.GenerateRequest) -> pb.FinalMessage:
    images = _images_of(request)
    return pb.FinalMessage(
        finish_reason=pb.FINISH_REASON_STOP,
        usage=pb.Usage(
            prompt_tokens=len(_prompt_of(request)) + 4 * len(images),
            completion_tokens=2,
            image_tokens=4 * len(images),
        ),
        images=[pb.ImageInfo(width=224, height=224, original_width=1, original_height=1)]
        * len(images),
    )


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


def memory_status_sample() -> cpb.MemoryStatus:
    status = cpb.MemoryStatus(
        devices=[cpb.DeviceMemory(device="cpu", weight_bytes=300 << 20, total_bytes=8 << 30)],
        modules=[
            cpb.ModuleResidency(
                name="vision", modality="image", tier=cpb.TIER_DISK, idle_seconds=12.5
            )
        ],
        requests=[cpb.RequestKv(request_id="req-7", tokens=40, bytes=1 << 20)],
        sessions=[cpb.SessionKv(session_id="会话-1", tokens=300, bytes=3 << 20, device="cpu")],
        kv_bytes=4 << 20,
        kv_budget_bytes=512 << 20,
        process_rss_bytes=900 << 20,
        running_requests=1,
        admission_mode=cpb.ADMISSION_MODE_LIMITED,
        admission_limit=2,
        pid=4242,
    )
    status.taken_at.FromSeconds(1_700_000_000)
    return status


class FakeControlServicer(cpb_grpc.ControlServiceServicer):
    """Serves a fixed memory account; every call needs the bearer token."""

    def __init__(self, fake: FakeServer) -> None:
        self._fake = fake

    @property
    def state(self) -> FakeState:
        return self._fake.state

    def _authorise(self, context) -> None:
        if dict(context.invocation_metadata()).get("authorization") != f"Bearer {CONTROL_TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing control token")

    def GetMemoryStatus(self, request, context):
        self._authorise(context)
        return cpb.GetMemoryStatusResponse(status=memory_status_sample())

    def WatchMemory(self, request, context):
        self._authorise(context)
        for running in range(3):
            status = memory_status_sample()
            status.running_requests = running
            yield cpb.WatchMemoryResponse(status=status)

    def OffloadModules(self, request, context):
        self._authorise(context)
        detail = f"{','.join(request.modalities)} -> {cpb.Tier.Name(request.tier)}"
        return cpb.OffloadModulesResponse(result=cpb.ActionResult(freed_bytes=1024, detail=detail))

    def SetAdmission(self, request, context):
        self._authorise(context)
        self.state.admission = request
        return cpb.SetAdmissionResponse(mode=request.mode, max_running=request.max_running)


def start_fake_server() -> tuple[grpc.Server, FakeServer]:
    """Start a loopback gRPC server running both fake servicers."""
    fake = FakeServer(target="", state=FakeState())
    limit = 64 * 1024 * 1024
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_receive_message_length", limit)],
    )
    pb_grpc.add_InferenceServiceServicer_to_server(FakeInferenceServicer(fake), server)
    cpb_grpc.add_ControlServiceServicer_to_server(FakeControlServicer(fake), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    fake.target = f"127.0.0.1:{port}"
    return server, fake
