"""Decode attention that reads the paged KV pool in place (`--paged-attention flex`).

The gather path (`kv_pool.PagedStep`) copies every row's keys and values out of the pool
into a dense [rows, kv_heads, longest, head_dim] tensor in each layer, then attends with
a padding mask. Here each decode row attends straight over the pool: PyTorch's
`flex_attention` with a block mask made from the rows' block tables, so the kernel
visits only the blocks a row owns (every block but its last whole, the last up to the
row's length) and nothing is copied or padded. vLLM's FlexAttention backend has the same
idea; this is it for our pool layout ([kv_heads, slots, head_dim] per layer, one KV block
of the mask per pool block).

`flex_attention` is fast only compiled, and compiled it consults `mask_mod` only inside
a row's partial block (eager, it scores the whole pool and ignores the block lists), so
it always runs compiled: once per process, with dynamic shapes. The gather path stays
the reference and the default; the two give the same logits
(tests/unit/test_flex_decode.py). A flex step runs eagerly, not in a captured decode
graph. The service offers it for a pool on GPUs only (`check_served`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface

from inference_svc.model.paged.kv_pool import KVPool, PagedStep
from inference_svc.model.paged.segment_step import attention_implementation, step_attention

FLEX = "autoglm_paged_flex"
PAGED_ATTENTION = ("gather", "flex")


class UnsupportedPagedAttention(ValueError):
    """`--paged-attention flex` where the KV pool is not on a GPU: a start-up error."""


def check_served(attention: str, layer_devices: list[str]) -> None:
    """The service reads a host pool by gathering: on a CPU the compiled flex kernel
    measured no faster, and it once aborted the process (SIGABRT inside the generated
    kernel, in a full test run; not reproduced alone), which no request may risk."""
    if attention == "flex" and not all(d.startswith("cuda") for d in layer_devices):
        raise UnsupportedPagedAttention(
            f"--paged-attention flex: the KV pool is on {', '.join(sorted(set(layer_devices)))}"
            f"; flex reads a pool on CUDA devices only (use gather)")


@cache
def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    return torch.compile(flex_attention, dynamic=True)


def table_block_mask(tables: list[list[int]], keys: list[int], block_size: int,
                     pool_blocks: int, device: torch.device) -> BlockMask:
    """Row b reads the first `keys[b]` positions of its blocks `tables[b]`: those whole
    blocks as full blocks, the rest of them as its one partial block."""
    rows = len(tables)
    width = max(len(t) for t in tables)
    table = torch.zeros((rows, width), dtype=torch.int32)
    for b, blocks in enumerate(tables):
        table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    length = torch.tensor(keys, dtype=torch.int32)
    whole, fill = length // block_size, length % block_size
    last = table.gather(1, whole.clamp(max=width - 1).long()[:, None])[:, 0]
    full_indices = torch.zeros((rows, 1, 1, pool_blocks), dtype=torch.int32)
    full_indices[:, 0, 0, :width] = table
    partial_indices = torch.zeros((rows, 1, 1, pool_blocks), dtype=torch.int32)
    partial_indices[:, 0, 0, 0] = last
    fill = fill.to(device)

    def inside_fill(b, h, q_idx, kv_idx):
        return kv_idx % block_size < fill[b]

    return BlockMask.from_kv_blocks(
        (fill > 0).to(torch.int32)[:, None, None], partial_indices.to(device),
        whole[:, None, None].to(device), full_indices.to(device),
        BLOCK_SIZE=(1, block_size), mask_mod=inside_fill,
        seq_lengths=(1, pool_blocks * block_size), compute_q_blocks=False)


class FlexPagedStep(PagedStep):
    """A decode step whose attention reads the pool through `block_mask`: `update`
    writes the new tokens' keys and values and gathers nothing."""

    @classmethod
    def decode(cls, pool: KVPool, tables: list[list[int]], lengths: list[int],
               dtype: torch.dtype, offsets: list[int] | None = None) -> FlexPagedStep:
        step = super().decode(pool, tables, lengths, dtype, offsets)
        step._tables, step._keys = tables, [n + 1 for n in lengths]
        step._masks = {}
        return step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(key_states, value_states, layer_idx)
        return key_states, value_states

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Every row's one query [rows, heads, 1, dim] over its own keys in the pool;
        [rows, 1, heads, dim], as transformers' attention functions return."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        rows = query.shape[0]
        out = compiled_flex_attention()(
            query, keys[None].expand(rows, -1, -1, -1).to(query.dtype),
            values[None].expand(rows, -1, -1, -1).to(query.dtype),
            block_mask=self._mask(query.device), scale=scaling, enable_gqa=True)
        return out.transpose(1, 2)

    def _mask(self, device: torch.device) -> BlockMask:
        key = str(device)
        if key not in self._masks:
            self._masks[key] = table_block_mask(self._tables, self._keys, self.pool.block_size,
                                                self.pool.capacity, device)
        return self._masks[key]


AttentionInterface.register(FLEX, step_attention)


def flex_decode_attention(layers: list[nn.Module]):
    """The decoder attends through `FlexPagedStep.attend` for the length of the block."""
    return attention_implementation(layers, FLEX)
