"""The memory account and action results as control-API messages: the edge's conversions."""

from __future__ import annotations

from collections.abc import Iterable

from autoglm.control.v1 import control_service_pb2 as pb
from inference_svc.memory.account import MemoryAccount
from inference_svc.memory.actions import Freed
from inference_svc.model.units import DISK, UnitState
from inference_svc.transport.tiers import tier_to_pb

ADMISSION_TO_PB = {"open": pb.ADMISSION_MODE_OPEN, "limited": pb.ADMISSION_MODE_LIMITED,
                   "paused": pb.ADMISSION_MODE_PAUSED}
ADMISSION_FROM_PB = {v: k for k, v in ADMISSION_TO_PB.items()}


def modules_to_pb(states: Iterable[UnitState]) -> list[pb.ModuleResidency]:
    return [
        pb.ModuleResidency(
            name=s.name, modality=s.modality, tier=tier_to_pb(s.tier),
            device="" if s.tier == DISK else s.tier, weight_bytes=s.weight_bytes,
            active_requests=s.active_requests, idle_seconds=s.idle_seconds,
            weight_precision=s.precision,
        )
        for s in states
    ]


def result_to_pb(freed: Freed) -> pb.ActionResult:
    return pb.ActionResult(freed_bytes=freed.total, freed_bytes_by_device=freed.bytes_by_device,
                           duration_seconds=freed.seconds, detail=freed.detail)


def account_to_pb(account: MemoryAccount,
                  recent_actions: Iterable[pb.ActionRecord]) -> pb.MemoryStatus:
    status = pb.MemoryStatus(
        devices=[pb.DeviceMemory(
            device=d.device, uuid=d.uuid, weight_bytes=d.weight_bytes, kv_bytes=d.kv_bytes,
            allocated_bytes=d.allocated_bytes, reserved_bytes=d.reserved_bytes,
            total_bytes=d.total_bytes, kv_pool_free_bytes=d.kv_pool_free_bytes,
        ) for d in account.devices],
        modules=modules_to_pb(account.modules),
        requests=[pb.RequestKv(request_id=r.request_id, session_id=r.session_id,
                               tokens=r.tokens, bytes=r.bytes) for r in account.requests],
        sessions=[pb.SessionKv(session_id=s.session_id, tokens=s.tokens, bytes=s.bytes,
                               idle_seconds=s.idle_seconds, device=s.device)
                  for s in account.sessions],
        kv_bytes=account.kv_bytes, kv_budget_bytes=account.kv_budget_bytes,
        process_rss_bytes=account.process_rss_bytes, running_requests=account.running_requests,
        queued_requests=account.queued_requests, modalities_in_use=account.modalities_in_use,
        admission_mode=ADMISSION_TO_PB[account.admission.mode],
        admission_limit=account.admission.max_running,
        completed_requests=account.completed_requests, pid=account.pid,
        recent_actions=list(recent_actions), cached_kv_bytes=account.cached_kv_bytes,
        shared_kv_bytes=account.shared_kv_bytes, swapped_kv_bytes=account.swapped_kv_bytes,
        kv_block_tokens=account.kv_block_tokens,
    )
    status.taken_at.FromDatetime(account.taken_at)
    return status
