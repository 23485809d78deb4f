"""ControlService: the memory account and actions, over a private listener."""

from __future__ import annotations

import asyncio
import collections
import hmac
import time

import grpc

from autoglm.control.v1 import control_service_pb2 as pb
from autoglm.control.v1 import control_service_pb2_grpc as pb_grpc
from autoglm_common.bounds import quote
from inference_svc.control.convert import (
    ADMISSION_FROM_PB,
    account_to_pb,
    modules_to_pb,
    result_to_pb,
)
from inference_svc.engine.engine import Admission, Engine
from inference_svc.errors import InvalidRequest, NotReady
from inference_svc.memory import actions
from inference_svc.memory.account import memory_account, module_states
from inference_svc.service_state import ServiceState
from inference_svc.transport.tiers import TIER_NAMES


class ControlServicer(pb_grpc.ControlServiceServicer):
    def __init__(self, state: ServiceState) -> None:
        self.state = state
        # Actions run one at a time: two concurrent offloads of one module are one offload.
        self._action_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._recent: collections.deque[pb.ActionRecord] = collections.deque(maxlen=16)

    def _engine(self) -> Engine:
        if self.state.engine is None:
            raise NotReady("the model is still loading")
        return self.state.engine

    def status(self) -> pb.MemoryStatus:
        return account_to_pb(memory_account(self._engine()), self._recent)

    async def GetMemoryStatus(self, request, context) -> pb.GetMemoryStatusResponse:
        return pb.GetMemoryStatusResponse(status=await asyncio.to_thread(self.status))

    async def WatchMemory(self, request: pb.WatchMemoryRequest, context):
        """Push the account at once, after every control action, and at least every interval;
        end the stream when the service begins to shut down."""
        interval = request.interval_seconds if request.interval_seconds > 0 else 1.0
        interval = max(0.05, min(interval, 3600.0))
        while not self._closing.is_set():
            yield pb.WatchMemoryResponse(status=await asyncio.to_thread(self.status))
            changed = asyncio.ensure_future(self._changed.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            _, pending = await asyncio.wait({changed, closing}, timeout=interval,
                                            return_when=asyncio.FIRST_COMPLETED)
            for waiter in pending:
                waiter.cancel()

    def close(self) -> None:
        """Shutting down: end every WatchMemory stream so they do not hold the grace period."""
        self._closing.set()

    def _acted(self, action: str, result: pb.ActionResult) -> None:
        """Record the action and wake watchers; the next change needs a fresh event."""
        record = pb.ActionRecord(action=action, result=result)
        record.at.GetCurrentTime()
        self._recent.appendleft(record)
        self._changed.set()
        self._changed = asyncio.Event()

    async def OffloadModules(self, request: pb.OffloadModulesRequest, context):
        engine = self._engine()
        modalities = self._modalities(engine, request.modalities)
        async with self._action_lock:
            if request.tier == pb.TIER_UNSPECIFIED:
                tier = actions.lower_tier(engine.model.device)
            elif request.tier in TIER_NAMES:
                tier = TIER_NAMES[request.tier]
            else:
                raise InvalidRequest("tier must be TIER_CPU or TIER_DISK to offload",
                                     field="tier")
            freed = await asyncio.to_thread(actions.offload_encoders, engine, modalities, tier)
        result = result_to_pb(freed)
        self._acted("OffloadModules", result)
        return pb.OffloadModulesResponse(result=result,
                                         modules=modules_to_pb(module_states(engine)))

    async def ReloadModules(self, request: pb.ReloadModulesRequest, context):
        engine = self._engine()
        modalities = self._modalities(engine, request.modalities)
        async with self._action_lock:
            freed = await asyncio.to_thread(actions.reload_encoders, engine, modalities)
        result = result_to_pb(freed)
        result.freed_bytes = 0
        result.freed_bytes_by_device.clear()
        self._acted("ReloadModules", result)
        return pb.ReloadModulesResponse(result=result,
                                        modules=modules_to_pb(module_states(engine)))

    async def TrimKvCache(self, request: pb.TrimKvCacheRequest, context):
        engine = self._engine()
        if request.policy == pb.TRIM_POLICY_TRUNCATE and request.max_tokens < 1:
            raise InvalidRequest("TRUNCATE needs max_tokens >= 1", field="max_tokens")
        policy = {pb.TRIM_POLICY_ALL_IDLE: "all", pb.TRIM_POLICY_TRUNCATE: "truncate",
                  pb.TRIM_POLICY_OFFLOAD_TO_CPU: "offload"}.get(request.policy, "lru")
        async with self._action_lock:
            freed, sessions = await asyncio.to_thread(
                actions.trim_kv, engine, policy, request.target_bytes, request.max_tokens)
        result = result_to_pb(freed)
        self._acted("TrimKvCache", result)
        return pb.TrimKvCacheResponse(result=result, sessions=sessions)

    async def CollectGarbage(self, request, context) -> pb.CollectGarbageResponse:
        async with self._action_lock:
            freed = await asyncio.to_thread(actions.collect_garbage)
        result = result_to_pb(freed)
        self._acted("CollectGarbage", result)
        return pb.CollectGarbageResponse(result=result)

    async def SetAdmission(self, request: pb.SetAdmissionRequest, context):
        engine = self._engine()
        if request.mode not in ADMISSION_FROM_PB:
            raise InvalidRequest("mode must be OPEN, LIMITED or PAUSED", field="mode")
        if request.mode == pb.ADMISSION_MODE_LIMITED and request.max_running < 1:
            raise InvalidRequest("LIMITED admission needs max_running >= 1", field="max_running")
        if request.lease_seconds < 0:
            raise InvalidRequest("lease_seconds must not be negative", field="lease_seconds")
        mode = ADMISSION_FROM_PB[request.mode]
        limit = request.max_running if mode == "limited" else 0
        lease = request.lease_seconds if mode != "open" else 0.0
        expires = time.monotonic() + lease if lease else None
        engine.set_admission(Admission(mode, limit, expires))
        result = pb.ActionResult(detail=f"admission {mode}")
        self._acted("SetAdmission", result)
        return pb.SetAdmissionResponse(
            mode=request.mode, max_running=limit, lease_seconds=lease, result=result)

    @staticmethod
    def _modalities(engine: Engine, names) -> list[str]:
        aliases = {"vision": "image", "image": "image", "audio": "audio"}
        chosen = []
        for name in names:
            if name not in aliases:
                raise InvalidRequest(f"unknown modality {quote(name)} (image, audio)",
                                     field="modalities")
            chosen.append(aliases[name])
        return [m for m in chosen if m in engine.model.encoders]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects control calls without `authorization: Bearer <token>` (TCP listeners)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(
                value.encode() if isinstance(value, str) else value, self._expected
            ):
                return await continuation(details)
        return _deny(await continuation(details))


def _deny(handler):
    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong control token")

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong control token")
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)

