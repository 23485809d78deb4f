"""The KV pool on GPUs, sized once at start-up from what each card has left.

On the host the pool is made at the whole budget from the start (its pages are committed
only as blocks are written). On a GPU memory is committed when allocated, so the pool
used to start small and double as requests came: each doubling copied the pool while a
request waited and dropped every captured decode graph. Now, with the weights loaded,
the pool is allocated once at the largest size that fits every card it spans, beside
what the card must keep free:

- the daemon's reserve (the memory plan's share of each card, model/sizing/cards.py);
- the encoders' activations (`--activation-budget-mb`: one request's media);
- the decode graphs captured next (`GRAPH_ALLOWANCE`: a decode step's activations and
  logits for the largest row bucket, far below this on a 9B decoder).

The operator's `--kv-budget-mb` stays the ceiling. A budget the cards cannot hold is
clamped to what they can, and said so in the log; a card without room for two blocks
stops the start-up.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.model.sizing.cards import RESERVE_FRACTION

GRAPH_ALLOWANCE = 256 * 1024**2


class NoRoomForKV(RuntimeError):
    """A card has no room for the KV pool's smallest size (two blocks)."""


@dataclass(frozen=True)
class CardRoom:
    device: str
    free_bytes: int
    total_bytes: int

    @classmethod
    def read(cls, device: str) -> CardRoom:
        free, total = torch.cuda.mem_get_info(torch.device(device))
        return cls(device, free, total)


def block_bytes_by_device(pool: KVPool) -> dict[str, int]:
    """Bytes one block takes on each device the pool's layers are on."""
    layers = Counter(pool.layer_devices)
    per_layer = pool.bytes_per_block // len(pool.layer_devices)
    return {device: count * per_layer for device, count in layers.items()}


def blocks_that_fit(budget_blocks: int, block_bytes: dict[str, int], rooms: list[CardRoom],
                    keep_bytes: int) -> int:
    """The most blocks, up to `budget_blocks`, that every card holds beside `keep_bytes`
    and the reserve; NoRoomForKV where a card cannot hold two."""
    blocks = budget_blocks
    for room in rooms:
        keep = keep_bytes + int(room.total_bytes * RESERVE_FRACTION)
        fit = max(0, room.free_bytes - keep) // block_bytes[room.device]
        if fit < 2:
            raise NoRoomForKV(
                f"{room.device} has {room.free_bytes / 2**30:.2f} GiB free after the weights, "
                f"and must keep {keep / 2**30:.2f} GiB (the memory daemon's reserve, "
                f"activations and decode graphs): no room for a KV cache")
        blocks = min(blocks, fit)
    return blocks


def cuda_devices(pool: KVPool) -> list[str]:
    return sorted({d for d in pool.layer_devices if d.startswith("cuda")})


def reserved_bytes(pool: KVPool) -> int:
    """Bytes the CUDA caching allocator holds on the pool's cards."""
    return sum(torch.cuda.memory_reserved(torch.device(d)) for d in cuda_devices(pool))
