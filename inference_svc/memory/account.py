"""The memory account: what the service holds, per device, module, request and session.

One snapshot, taken on demand (the control API's GetMemoryStatus and WatchMemory): the
engine's KV ledger and session caches, each module's tier, process RSS, and per CUDA
device the allocator's counters beside the device's total.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from inference_svc.engine.engine import Engine
from inference_svc.engine.jobs import Admission
from inference_svc.model.units import UnitState, weights_by_device
from inference_svc.process_memory import cuda_devices, host_memory_bytes, rss_bytes


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cpu" or "cuda:N"
    weight_bytes: int
    kv_bytes: int
    total_bytes: int
    uuid: str = ""  # NVML's spelling, "GPU-..."; empty for the host
    allocated_bytes: int = 0  # the CUDA caching allocator's; zero for the host
    reserved_bytes: int = 0
    kv_pool_free_bytes: int = 0  # KV pool allocated on a GPU that holds no token


@dataclass(frozen=True)
class RequestKv:
    request_id: str
    session_id: str
    tokens: int
    bytes: int


@dataclass(frozen=True)
class SessionKv:
    session_id: str
    tokens: int
    bytes: int
    idle_seconds: float
    device: str


@dataclass(frozen=True)
class MemoryAccount:
    taken_at: datetime
    devices: list[DeviceMemory]
    modules: list[UnitState]
    requests: list[RequestKv]
    sessions: list[SessionKv]
    kv_bytes: int  # held plus cached; blocks several owners share count once
    cached_kv_bytes: int
    shared_kv_bytes: int
    swapped_kv_bytes: int
    kv_block_tokens: int
    kv_budget_bytes: int
    process_rss_bytes: int
    running_requests: int
    queued_requests: int
    completed_requests: int
    modalities_in_use: list[str]
    admission: Admission
    pid: int


def module_states(engine: Engine) -> list[UnitState]:
    return [unit.state() for unit in engine.model.units]


def memory_account(engine: Engine) -> MemoryAccount:
    taken_at = datetime.now(UTC)
    kv = engine.kv_account()
    running = engine.running()
    requests = [
        RequestKv(request_id=r.request_id, session_id=r.session_id,
                  tokens=r.prompt_tokens + r.generated_tokens,
                  bytes=kv.blocks_by_owner.get(r.request_id, 0) * kv.bytes_per_block)
        for r in running
    ]
    now = time.monotonic()
    sessions = [
        SessionKv(session_id=e.key, tokens=e.tokens, bytes=e.bytes,
                  idle_seconds=now - e.last_used, device=e.device or str(engine.model.device))
        for e in engine.sessions.entries()
    ]
    modules = module_states(engine)
    kv_bytes = kv.held_bytes + kv.cached_bytes
    return MemoryAccount(
        taken_at=taken_at,
        devices=device_memory(modules, kv_bytes, kv_layers=engine.ledger.pool.layer_devices,
                              kv_pool_free_bytes=kv.free_pool_bytes),
        modules=modules, requests=requests, sessions=sessions, kv_bytes=kv_bytes,
        cached_kv_bytes=kv.cached_bytes, shared_kv_bytes=kv.shared_bytes,
        swapped_kv_bytes=kv.swapped_bytes, kv_block_tokens=kv.block_size,
        kv_budget_bytes=engine.config.kv_budget_bytes, process_rss_bytes=rss_bytes(),
        running_requests=len(running), queued_requests=engine.queued,
        completed_requests=engine.completed,
        modalities_in_use=sorted(engine.modalities_in_use()), admission=engine.admission,
        pid=os.getpid(),
    )


def kv_by_device(kv_bytes: int, kv_layers: list[str]) -> dict[str, int]:
    """The KV bytes each device holds: every block has a slice on each layer's device, so a
    decoder split over devices holds its KV in their layers' shares."""
    counts = Counter(kv_layers)
    return {device: kv_bytes * count // len(kv_layers) for device, count in counts.items()}


def device_memory(modules: list[UnitState], kv_bytes: int, *, kv_layers: list[str],
                  kv_pool_free_bytes: int = 0) -> list[DeviceMemory]:
    """Per device: weights of every resident module, KV (`kv_layers`: each decoder layer's
    device) and the pool allocated there that holds none, allocator and total bytes."""
    weights = weights_by_device(modules)
    kv = kv_by_device(kv_bytes, kv_layers)
    pool_free = kv_by_device(kv_pool_free_bytes, kv_layers)
    accounts = [DeviceMemory(device="cpu", weight_bytes=weights.get("cpu", 0),
                             kv_bytes=kv.get("cpu", 0), total_bytes=host_memory_bytes())]
    for device in cuda_devices():
        _, total = torch.cuda.mem_get_info(device)
        accounts.append(DeviceMemory(
            device=device, uuid=f"GPU-{torch.cuda.get_device_properties(device).uuid}",
            weight_bytes=weights.get(device, 0), kv_bytes=kv.get(device, 0),
            total_bytes=total, allocated_bytes=torch.cuda.memory_allocated(device),
            reserved_bytes=torch.cuda.memory_reserved(device),
            kv_pool_free_bytes=pool_free.get(device, 0),
        ))
    return accounts
