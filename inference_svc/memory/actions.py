"""Memory actions shared by the service itself and the control API.

Each returns what it freed, measured: process RSS on the host (after returning freed
heap to the OS), allocator bytes per CUDA device.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import torch

from inference_svc.engine.engine import Engine
from inference_svc.model.units import DISK
from inference_svc.process_memory import cuda_devices, release_freed_memory, rss_bytes

log = structlog.get_logger("memory")


@dataclass
class Freed:
    bytes_by_device: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    detail: str = ""

    @property
    def total(self) -> int:
        return sum(self.bytes_by_device.values())


def _snapshot() -> dict[str, int]:
    readings = {"cpu": rss_bytes()}
    for device in cuda_devices():
        readings[device] = torch.cuda.memory_reserved(device)
    return readings


def measured(action: str, work: Callable[[], str], *, settle_first: bool = True) -> Freed:
    """Run `work` between two measurements; report the drop per device.

    With `settle_first`, garbage is collected before the first reading, so that the
    drop is what `work` freed and not garbage that happened to be lying around.
    """
    started = time.monotonic()
    if settle_first:
        release_freed_memory()
    before = _snapshot()
    detail = work()
    release_freed_memory()
    after = _snapshot()
    freed = Freed(
        {d: max(0, before[d] - after.get(d, 0)) for d in before},
        time.monotonic() - started, detail,
    )
    log.info("memory_action", action=action, detail=detail, freed_bytes=freed.total,
             before=before, after=after, seconds=round(freed.seconds, 4))
    return freed


def collect_garbage() -> Freed:
    def work() -> str:
        release_freed_memory()
        return "gc + allocator release"

    return measured("collect_garbage", work, settle_first=False)


def offload_encoders(
    engine: Engine, modalities: list[str], tier: str, *, wait_s: float = 5.0
) -> Freed:
    """Move encoders of the given modalities (default: those not in use) to `tier`."""

    def work() -> str:
        in_use = engine.modalities_in_use()
        chosen = modalities or [m for m in engine.model.encoders if m not in in_use]
        moved = []
        for modality in chosen:
            unit = engine.model.encoders.get(modality)
            if unit is not None and unit.tier != tier and unit.move_to(tier, timeout=wait_s) > 0:
                moved.append(f"{unit.name}->{tier}")
        return ", ".join(moved) or "nothing to move"

    return measured("offload_encoders", work)


def reload_encoders(engine: Engine, modalities: list[str]) -> Freed:
    def work() -> str:
        chosen = modalities or list(engine.model.encoders)
        loaded = []
        for modality in chosen:
            unit = engine.model.encoders.get(modality)
            if unit is not None and unit.tier != unit.home:
                unit.load()
                loaded.append(f"{unit.name}->{unit.home}")
        return ", ".join(loaded) or "all resident"

    return measured("reload_encoders", work)


def trim_kv(engine: Engine, policy: str, target_bytes: int, max_tokens: int
            ) -> tuple[Freed, list[str]]:
    """Release idle cached KV: LRU down to a target, all of it, or truncate each entry."""
    affected: list[str] = []

    def work() -> str:
        result = engine.trim_kv(policy, target_bytes, max_tokens)
        affected.extend(result.sessions)
        return f"{policy}: {len(result.sessions)} entries, {result.freed_bytes} KV bytes"

    return measured("trim_kv", work), affected


def lower_tier(home: str) -> str:
    return "cpu" if home.startswith("cuda") else DISK
