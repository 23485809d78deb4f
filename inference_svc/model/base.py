"""What every served model shares: its units and what they say about it."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from inference_svc.model.paged_kv import KVPool, RowSlots
from inference_svc.model.prompt import PromptPlan
from inference_svc.model.units import ModuleUnit


class UnitModel:
    """A model made of separately resident units: a decoder and per-modality encoders."""

    manifest: object
    decoder_unit: ModuleUnit
    encoders: dict[str, ModuleUnit]

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def units(self) -> list[ModuleUnit]:
        return [self.decoder_unit, *self.encoders.values()]

    @property
    def modalities(self) -> list[str]:
        return ["text", *self.encoders]


@runtime_checkable
class PagedDecoder(Protocol):
    """A model whose decoder runs on block-paged KV (engine batches it step by step)."""

    def new_kv_pool(self, *, block_size: int, blocks: int) -> KVPool: ...

    def prompt_embeddings(self, plan: PromptPlan, media, *, cached: int = 0) -> torch.Tensor: ...

    def forward_paged(self, pool: KVPool, rows: list[list[RowSlots]],
                      inputs: list[list[torch.Tensor]]) -> torch.Tensor: ...

    def decode_paged(self, pool: KVPool, tables: list[list[int]], lengths: list[int],
                     tokens: list[int]) -> torch.Tensor: ...
