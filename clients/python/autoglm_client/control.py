"""Synchronous client of the control API (memory account and memory actions).

The control API listens on a Unix socket by default; over TCP it wants a bearer token,
sent as `authorization: Bearer <token>` metadata, and normally TLS: pass
`credentials=tls_credentials(ca_file)` (with a client certificate and key for mTLS).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Literal

import grpc

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from autoglm_client.channel import CallDefaults, ClosesChannel, open_channel
from autoglm_client.errors import InputError
from autoglm_client.translate import rpc_errors_translated

DEFAULT_CONTROL_TARGET = "unix:///tmp/autoglm-control.sock"

TierName = Literal["gpu", "cpu", "disk"]
TrimPolicyName = Literal["lru", "all_idle", "truncate"]
AdmissionModeName = Literal["open", "limited", "paused"]

_TIERS = {"gpu": cpb.TIER_GPU, "cpu": cpb.TIER_CPU, "disk": cpb.TIER_DISK}
_TRIM_POLICIES = {
    "lru": cpb.TRIM_POLICY_LRU,
    "all_idle": cpb.TRIM_POLICY_ALL_IDLE,
    "truncate": cpb.TRIM_POLICY_TRUNCATE,
}
_ADMISSION_MODES = {
    "open": cpb.ADMISSION_MODE_OPEN,
    "limited": cpb.ADMISSION_MODE_LIMITED,
    "paused": cpb.ADMISSION_MODE_PAUSED,
}


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that carries a control token, or none without one."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class ControlClient(ClosesChannel):
    """Blocking client of `autoglm.control.v1.ControlService`."""

    def __init__(
        self,
        target: str = DEFAULT_CONTROL_TARGET,
        *,
        token: str | None = None,
        timeout: float | None = 10.0,
        metadata: Iterable[tuple[str, str]] = (),
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self._channel = open_channel(target, credentials)
        self._stub = cpb_grpc.ControlServiceStub(self._channel)
        self._defaults = CallDefaults.of(timeout, (*metadata, *auth_metadata(token)))

    def memory_status(self) -> cpb.MemoryStatus:
        """The service's full memory account."""
        with rpc_errors_translated():
            response = self._stub.GetMemoryStatus(cpb.GetMemoryStatusRequest(), **self._kwargs())
        return response.status

    def watch(self, interval_seconds: float = 1.0) -> Iterator[cpb.MemoryStatus]:
        """Yield the account on every change, or at least every `interval_seconds`.

        Runs until the caller stops iterating (which cancels the call) or the server ends it.
        """
        request = cpb.WatchMemoryRequest(interval_seconds=interval_seconds)
        call = self._stub.WatchMemory(request, metadata=self._defaults.metadata or None)
        try:
            with rpc_errors_translated():
                for response in call:
                    yield response.status
        finally:
            call.cancel()

    def offload(
        self, modalities: Iterable[str] = (), tier: TierName | None = None
    ) -> cpb.OffloadModulesResponse:
        """Move the encoders of `modalities` (all idle ones when empty) to `tier`."""
        request = cpb.OffloadModulesRequest(
            modalities=list(modalities),
            tier=_lookup(_TIERS, tier, "tier") if tier else cpb.TIER_UNSPECIFIED,
        )
        with rpc_errors_translated():
            return self._stub.OffloadModules(request, **self._kwargs())

    def reload(self, modalities: Iterable[str] = ()) -> cpb.ReloadModulesResponse:
        """Bring the encoders of `modalities` (all when empty) back to their home tier."""
        request = cpb.ReloadModulesRequest(modalities=list(modalities))
        with rpc_errors_translated():
            return self._stub.ReloadModules(request, **self._kwargs())

    def trim_kv_cache(
        self, policy: TrimPolicyName = "lru", target_bytes: int = 0, max_tokens: int = 0
    ) -> cpb.TrimKvCacheResponse:
        """Release cached KV of idle sessions."""
        request = cpb.TrimKvCacheRequest(
            policy=_lookup(_TRIM_POLICIES, policy, "trim policy"),
            target_bytes=target_bytes,
            max_tokens=max_tokens,
        )
        with rpc_errors_translated():
            return self._stub.TrimKvCache(request, **self._kwargs())

    def collect_garbage(self) -> cpb.CollectGarbageResponse:
        """Run gc and release allocator caches."""
        with rpc_errors_translated():
            return self._stub.CollectGarbage(cpb.CollectGarbageRequest(), **self._kwargs())

    def set_admission(
        self, mode: AdmissionModeName, max_running: int = 0
    ) -> cpb.SetAdmissionResponse:
        """Open, limit (to `max_running`) or pause admission of new requests."""
        request = cpb.SetAdmissionRequest(
            mode=_lookup(_ADMISSION_MODES, mode, "admission mode"), max_running=max_running
        )
        with rpc_errors_translated():
            return self._stub.SetAdmission(request, **self._kwargs())

    def _kwargs(self) -> dict[str, object]:
        return self._defaults.call_kwargs(None, None)


def _lookup(table: dict[str, int], name: str, what: str) -> int:
    if name not in table:
        raise InputError(f"unknown {what} {name!r}; use one of {tuple(table)}")
    return table[name]
