"""The control client: policy actions -> ControlService RPCs, with deadlines and retries.

Transient failures (the service restarting, a deadline) are retried with exponential
backoff; after a failed streak the channel is rebuilt so a restarted service on the same
socket or port is found again. Nothing here raises past `ControlCallError`.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.control.v1 import control_service_pb2 as pb
from autoglm.control.v1 import control_service_pb2_grpc as pb_grpc
from memory_daemon.config import ControlSection
from memory_daemon.errors import ControlCallError
from memory_daemon.policy import Action, ActionKind, Admission, ServiceView

_RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)
_CHANNEL_OPTIONS = (
    # A rebuilt channel must dial afresh: subchannels from the process-wide pool keep the
    # old connection's failure and reconnect backoff.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# "auto" leaves the tier unset: the service moves encoders one tier down from their home
# (GPU -> host memory, host memory -> disk), which only it knows.
_TIERS = {"auto": pb.TIER_UNSPECIFIED, "cpu": pb.TIER_CPU, "disk": pb.TIER_DISK}
_ADMISSION_TO_PB = {
    Admission.OPEN: pb.ADMISSION_MODE_OPEN,
    Admission.LIMITED: pb.ADMISSION_MODE_LIMITED,
    Admission.PAUSED: pb.ADMISSION_MODE_PAUSED,
}
_ADMISSION_FROM_PB = {value: key for key, value in _ADMISSION_TO_PB.items()}

_CONTROL_SERVICE = pb.DESCRIPTOR.services_by_name["ControlService"].full_name

Reply = TypeVar("Reply")


@dataclass(frozen=True, slots=True)
class ActionOutcome:
    """What the service reported for one action."""

    freed_bytes: int
    duration_seconds: float
    detail: str


def service_view(status: pb.MemoryStatus) -> ServiceView:
    return ServiceView(
        completed_requests=status.completed_requests,
        admission=_ADMISSION_FROM_PB.get(status.admission_mode, Admission.OPEN),
        admission_limit=status.admission_limit,
    )


# A restriction the daemon set lapses unless renewed; the daemon re-applies its wanted
# admission whenever the service reports another mode, so a live daemon renews it.
ADMISSION_LEASE_SECONDS = 60.0


def channel_credentials(config: ControlSection) -> grpc.ChannelCredentials | None:
    """TLS credentials from the configured PEM files, or None for a plaintext channel."""
    if not config.tls:
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.tls_ca),
        private_key=read(config.tls_key),
        certificate_chain=read(config.tls_cert),
    )


class ControlClient:
    """A ControlService client over a Unix socket or token-authenticated TCP (TLS or not)."""

    def __init__(self, config: ControlSection, offload_tier: str = "auto") -> None:
        self._config = config
        self._offload_tier = _TIERS[offload_tier]
        self._metadata = (("authorization", f"Bearer {config.token}"),) if config.token else ()
        self._credentials = channel_credentials(config)  # read once; rebuilt channels reuse it
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ControlServiceStub | None = None

    def _connect(self) -> pb_grpc.ControlServiceStub:
        if self._stub is None:
            target = self._config.target
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            else:
                self._channel = grpc.aio.secure_channel(
                    target, self._credentials, options=_CHANNEL_OPTIONS
                )
            self._stub = pb_grpc.ControlServiceStub(self._channel)
        return self._stub

    async def _reset(self) -> None:
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        await self._reset()

    async def _call(
        self,
        rpc: str,
        invoke: Callable[[pb_grpc.ControlServiceStub, dict[str, Any]], Awaitable[Reply]],
        retries: int,
    ) -> Reply:
        config = self._config
        delay = config.backoff_initial_seconds
        for attempt in range(retries + 1):
            stub = self._connect()
            try:
                return await invoke(
                    stub, {"timeout": config.deadline_seconds, "metadata": self._metadata}
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code not in _RETRYABLE or attempt == retries:
                    if code in _RETRYABLE:
                        await self._reset()
                    raise ControlCallError(rpc, code.name, exc.details() or "") from exc
            await asyncio.sleep(delay)
            delay = min(config.backoff_max_seconds, delay * 2)
        raise AssertionError("unreachable: the loop returns or raises")

    async def memory_status(self) -> pb.MemoryStatus:
        """One attempt: the daemon's loop is the retry for status reads."""
        reply = await self._call(
            "GetMemoryStatus",
            lambda stub, kw: stub.GetMemoryStatus(pb.GetMemoryStatusRequest(), **kw),
            retries=0,
        )
        return reply.status

    async def watch_memory(
        self, interval_seconds: float, silence_seconds: float
    ) -> AsyncIterator[pb.MemoryStatus]:
        """The statuses the service pushes; ends only by raising `ControlCallError`.

        No push for `silence_seconds` counts as a broken stream (DEADLINE_EXCEEDED).
        """
        request = pb.WatchMemoryRequest(interval_seconds=interval_seconds)
        call = self._connect().WatchMemory(request, metadata=self._metadata)
        try:
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), silence_seconds)
                except TimeoutError:
                    code, details = "DEADLINE_EXCEEDED", f"no push for {silence_seconds}s"
                    break
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code().name, exc.details() or ""
                    break
                if response is grpc.aio.EOF:
                    code, details = "UNAVAILABLE", "the service ended the stream"
                    break
                yield response.status
        finally:
            call.cancel()
        await self._stream_broken("WatchMemory", code, details)

    async def until_not_serving(self) -> None:
        """Return once the service reports the ControlService NOT_SERVING (for example on
        entering a graceful shutdown); never returns where it offers no health watch."""
        request = health_pb2.HealthCheckRequest(service=_CONTROL_SERVICE)
        self._connect()
        health = health_pb2_grpc.HealthStub(self._channel)
        try:
            async for reply in health.Watch(request, metadata=self._metadata):
                if reply.status != health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                await self._stream_broken("Health.Watch", exc.code().name, exc.details() or "")
        await asyncio.Event().wait()

    async def _stream_broken(self, rpc: str, code: str, details: str) -> NoReturn:
        if grpc.StatusCode[code] in _RETRYABLE:
            await self._reset()
        raise ControlCallError(rpc, code, details)

    async def execute(self, action: Action) -> ActionOutcome:
        """Run one policy action; returns what the service says it freed."""
        started = time.monotonic()
        request, rpc = self._request(action)
        reply = await self._call(
            rpc, lambda stub, kw: getattr(stub, rpc)(request, **kw), self._config.retries
        )
        result = reply.result
        return ActionOutcome(
            freed_bytes=result.freed_bytes,
            duration_seconds=result.duration_seconds or time.monotonic() - started,
            detail=result.detail,
        )

    def _request(self, action: Action) -> tuple[Any, str]:
        match action.kind:
            case ActionKind.COLLECT_GARBAGE:
                return pb.CollectGarbageRequest(), "CollectGarbage"
            case ActionKind.TRIM_KV:
                request = pb.TrimKvCacheRequest(
                    policy=pb.TRIM_POLICY_LRU, target_bytes=max(1, action.target_bytes)
                )
                return request, "TrimKvCache"
            case ActionKind.OFFLOAD_ENCODERS:
                request = pb.OffloadModulesRequest(modalities=[], tier=self._offload_tier)
                return request, "OffloadModules"
            case ActionKind.PREFETCH_ENCODERS:
                return pb.ReloadModulesRequest(modalities=[]), "ReloadModules"
            case ActionKind.SET_ADMISSION:
                request = pb.SetAdmissionRequest(
                    mode=_ADMISSION_TO_PB[action.admission], max_running=action.admission_limit,
                    lease_seconds=ADMISSION_LEASE_SECONDS,
                )
                return request, "SetAdmission"
        raise AssertionError(f"unhandled action kind {action.kind}")
