"""Modality-aware residency: keep on the fastest tier only the encoders in recent use.

An encoder idle for longer than `idle_seconds` is demoted one tier (cuda -> cpu, or
cpu -> disk on hosts without a GPU). Demotion is by idle time, not per request, so a
mixed stream of image and text requests does not thrash; a request that needs a
demoted encoder promotes it again on demand (ModuleUnit.use()).
"""

from __future__ import annotations

import asyncio

import structlog

from inference_svc.engine.engine import Engine
from inference_svc.memory import actions

log = structlog.get_logger("residency")


class ResidencyPolicy:
    def __init__(self, engine: Engine, *, idle_seconds: float) -> None:
        if idle_seconds <= 0:
            raise ValueError("idle_seconds must be positive")
        self.engine = engine
        self.idle_seconds = idle_seconds

    def idle_encoders(self) -> list[str]:
        """Modalities whose encoder sits on its home tier, unused for too long."""
        chosen = []
        in_use = self.engine.modalities_in_use()  # a live audio stream's among them
        for modality, unit in self.engine.model.encoders.items():
            state = unit.state()
            if (state.tier == unit.home and state.active_requests == 0
                    and modality not in in_use and state.idle_seconds > self.idle_seconds):
                chosen.append(modality)
        return chosen

    def tick(self) -> actions.Freed | None:
        modalities = self.idle_encoders()
        if not modalities:
            return None
        tier = actions.lower_tier(self.engine.model.device)
        freed = actions.offload_encoders(self.engine, modalities, tier, wait_s=0.0)
        log.info("encoders_demoted", modalities=modalities, tier=tier,
                 freed_bytes=freed.total, idle_seconds=self.idle_seconds)
        return freed

    async def run(self) -> None:
        interval = max(0.05, self.idle_seconds / 4)
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(self.tick)
