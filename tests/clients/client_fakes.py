"""Test doubles for the client tests besides the shared fake inference service
(tests/support/fake_inference.py): a fake control servicer, and the scripts the tests give
the fake. They follow the .proto contracts but run no model; the real server is exercised
by test_end_to_end.py through the shared `inference_server` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from tests.support.fake_inference import fail

CONTROL_TOKEN = "s3cret"
BIG_REPLY_BYTES = 5 * 1024 * 1024  # beyond grpc's default 4 MiB receive limit
KV_FULL = fail(  # what a full KV budget answers, with a retry hint
    grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget full",
    trailing_metadata=(("retry-after-ms", "1500"),),
)


@dataclass
class ControlState:
    """What the fake control servicer saw."""

    admission: cpb.SetAdmissionRequest | None = None


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

    def __init__(self) -> None:
        self.state = ControlState()

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
