"""One decoder forward over a flat pack of segments: prompt chunks and decode rows together.

Every new token of the step sits in one row, end to end, so the weights are read once
for all of them and no query is padding. A segment is one sequence's new tokens; it
attends only to its own positions, read from the paged pool in place of a dense mask
over the whole pack (which would spend most of the attention work on masked pairs):

- a prompt chunk (several tokens) attends causally over its keys, earlier chunks'
  included, in one `scaled_dot_product_attention` call of its own;
- decode rows (one token each) attend over their sequences' keys in one batched call,
  each row's keys gathered and padded to the longest (the null block, masked).

The model's own layers, rope and MLPs run unchanged: the step is the `cache` whose
`update` writes the new keys and values into their slots, and `attend` is registered
with transformers as an attention implementation that the decoder uses for the length
of a forward (`segment_attention`). vLLM and SGLang cut a mixed batch the same way
(flattened tokens, attention per sequence); here the per-sequence kernels are PyTorch's
SDPA over gathered blocks.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from inference_svc.model.paged.kv_pool import NULL_BLOCK, KVPool, RowSlots

SEGMENTS = "autoglm_segments"


class SegmentStep:
    """The `cache` of one forward over `segments`, packed in one row in their order."""

    def __init__(self, pool: KVPool, segments: list[RowSlots],
                 given: list[torch.Tensor | None] | None = None) -> None:
        """`given[i]`, when set, holds segment i's positions on each rotary axis
        [axes, new tokens] (a multimodal rope; one axis stands for all, as a decode row's
        index plus its offset does); otherwise a position is its index."""
        self.pool = pool
        counts = [len(s.write) for s in segments]
        starts = [0, *itertools.accumulate(counts)][:-1]  # each segment's first query
        self.last = [start + n - 1 for start, n in zip(starts, counts, strict=True)]
        self._write = torch.cat([s.write for s in segments])
        self.positions = _positions(segments, given)
        # prompt chunks: (first query, segment, its causal mask or None)
        self._chunks = [(start, s, _chunk_mask(len(s.write), len(s.read)))
                        for start, s in zip(starts, segments, strict=True) if len(s.write) > 1]
        singles = [(start, s) for start, s in zip(starts, segments, strict=True)
                   if len(s.write) == 1]
        self._single_queries = torch.tensor([start for start, _ in singles], dtype=torch.long)
        self._single_reads, self._single_mask = _padded_reads(
            [s.read for _, s in singles], pool.block_size)
        self._on: dict[str, dict[str, object]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' keys and values into their slots; attention reads the
        pool (`attend`), so what is returned is only the new states."""
        write = self._tensors(key_states.device)["write"]
        for new, store in ((key_states, self.pool.keys), (value_states, self.pool.values)):
            pool = store[layer_idx]
            pool.index_copy_(1, write, new[0].to(pool.dtype))
        return key_states, value_states

    def attend(self, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Attention of every segment's queries [1, heads, tokens, dim] over its own keys;
        [1, tokens, heads, dim], as transformers' attention functions return."""
        keys, values = self.pool.keys[layer], self.pool.values[layer]
        on = self._tensors(query.device)
        out = torch.empty_like(query)
        for (start, segment, _), read, mask in zip(self._chunks, on["chunk_reads"],
                                                   on["chunk_masks"], strict=True):
            n = len(segment.write)
            q = query[:, :, start:start + n]
            k = keys.index_select(1, read)[None].to(q.dtype)
            v = values.index_select(1, read)[None].to(q.dtype)
            out[:, :, start:start + n] = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                enable_gqa=True)
        if len(self._single_queries):
            rows, width = self._single_mask.shape
            index = on["single_queries"]
            q = query[0, :, index].transpose(0, 1)[:, :, None]  # [rows, heads, 1, dim]
            reads = on["single_reads"]
            k = keys.index_select(1, reads).view(keys.shape[0], rows, width, -1)
            v = values.index_select(1, reads).view(values.shape[0], rows, width, -1)
            attended = F.scaled_dot_product_attention(
                q, k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
                attn_mask=on["single_mask"], scale=scaling, enable_gqa=True)
            out[0, :, index] = attended[:, :, 0].transpose(0, 1)
        return out.transpose(1, 2)

    def _tensors(self, device: torch.device) -> dict[str, object]:
        key = str(device)
        if key not in self._on:
            self._on[key] = {
                "write": self._write.to(device),
                "chunk_reads": [s.read.to(device) for _, s, _ in self._chunks],
                "chunk_masks": [None if m is None else m.to(device) for _, _, m in self._chunks],
                "single_queries": self._single_queries.to(device),
                "single_reads": self._single_reads.to(device),
                "single_mask": self._single_mask[:, None, None, :].to(device),
            }
        return self._on[key]


def _positions(segments: list[RowSlots], given: list[torch.Tensor | None] | None
               ) -> torch.Tensor:
    """[1, tokens], or [axes, 1, tokens] where some segment's positions are given."""
    own = [torch.arange(s.start, s.start + len(s.write)) for s in segments]
    if given is None or all(p is None for p in given):
        return torch.cat(own)[None]
    axes = max(p.shape[0] for p in given if p is not None)
    parts = [(o[None] if p is None else p.to(torch.long)).expand(axes, -1)
             for o, p in zip(own, given, strict=True)]
    positions = torch.cat(parts, dim=1)
    return positions if axes == 1 else positions[:, None]


def _chunk_mask(queries: int, keys: int) -> torch.Tensor | None:
    """Which keys each query of a chunk reads: those up to its own position (its
    sequence's earlier tokens come first); None where plain causal says it."""
    if queries == keys:
        return None
    own = torch.arange(keys - queries, keys)
    return torch.arange(keys)[None, :] <= own[:, None]


def _padded_reads(reads: list[torch.Tensor], block_size: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every decode row's read slots padded to the longest with the null block, flat
    [rows * width], and which are real [rows, width]."""
    if not reads:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, 0), dtype=torch.bool)
    width = max(len(r) for r in reads)
    padded = torch.full((len(reads), width), NULL_BLOCK * block_size, dtype=torch.long)
    real = torch.zeros((len(reads), width), dtype=torch.bool)
    for row, read in enumerate(reads):
        padded[row, :len(read)] = read
        real[row, :len(read)] = True
    return padded.reshape(-1), real


def step_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                   scaling: float | None = None, paged_step: object | None = None,
                   **_: object) -> tuple[torch.Tensor, None]:
    """An attention implementation for transformers that hands each layer's queries to
    the forward's step (`paged_step`: a SegmentStep, or flex_decode's FlexPagedStep),
    which reads the keys from the paged pool itself."""
    if paged_step is None:
        raise RuntimeError("paged attention runs only inside a forward given its paged_step")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return paged_step.attend(module.layer_idx, query, scale), None


AttentionInterface.register(SEGMENTS, step_attention)


@contextmanager
def attention_implementation(layers: list[nn.Module], name: str) -> Iterator[None]:
    """The decoder attends through the registered attention `name` for the length of the
    block (the layers share one config; the model thread alone runs decoder forwards)."""
    config = layers[0].self_attn.config
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def segment_attention(layers: list[nn.Module]):
    """The decoder attends through `SegmentStep.attend` for the length of the block."""
    return attention_implementation(layers, SEGMENTS)
