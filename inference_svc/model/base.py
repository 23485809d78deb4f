"""What every served model shares: its units and what they say about it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.paged.kv_pool import KVPool, RowSlots
from inference_svc.model.units import ModuleUnit


class UnitModel:
    """A model made of separately resident units: a decoder and per-modality encoders."""

    manifest: object
    decoder_unit: ModuleUnit
    encoders: dict[str, ModuleUnit]
    # the pixel budget per image unless the operator sets --max-pixels
    # (1280*28*28, the reference deployment's)
    default_max_pixels: int = 1_003_520

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def units(self) -> list[ModuleUnit]:
        return [self.decoder_unit, *self.encoders.values()]

    @property
    def modalities(self) -> list[str]:
        return ["text", *self.encoders]


@dataclass(frozen=True)
class PromptInputs:
    """What the decoder is fed for a prompt's positions from `cached` on."""

    embeds: torch.Tensor  # [n, hidden], media features in their slots
    positions: torch.Tensor | None = None  # [axes, n] rope positions; None: the index
    position_offset: int = 0  # a generated token at index i has position i + offset


@runtime_checkable
class PagedDecoder(Protocol):
    """A model whose decoder runs on block-paged KV (the engine batches it step by step)."""

    def new_kv_pool(self, *, block_size: int, blocks: int) -> KVPool: ...

    def prompt_inputs(self, plan: PromptPlan, media, *, cached: int = 0,
                      live=None) -> PromptInputs: ...

    def forward_paged(self, pool: KVPool, segments: list[RowSlots],
                      inputs: list[torch.Tensor],
                      positions: list[torch.Tensor | None] | None = None) -> torch.Tensor: ...

    def decode_paged(self, pool: KVPool, tables: list[list[int]], lengths: list[int],
                     tokens: list[int], offsets: list[int] | None = None) -> torch.Tensor: ...

    def capture_decode_steps(self, pool: KVPool, max_rows: int) -> bool: ...

    def read_kv_by(self, attention: str) -> None: ...

    def capture_ahead(self, pool: KVPool) -> int: ...

    def compile_host_steps(self, pool: KVPool) -> bool: ...
