"""KV in fixed-size blocks: the storage, and one decoder forward that writes and reads it.

The pool holds each layer's keys and values as [kv_heads, slots, head_dim], one slot per
token position and `block_size` slots per block: head-major, so that a gathered row is
one contiguous [keys, head_dim] slab per head, which attention reads 2.5x faster than
the token-major interleave (tiny GLM-4.1V, four 3,151-key decode rows, one CPU thread:
0.60 against 1.53 ms per layer). Block 0 is never handed out: padded reads point at
it (masked), and a captured decode graph's padding rows write into it. Which blocks a
sequence owns is the engine's business (engine/kv_blocks.py); a forward is told, per
row, the slot of each new token and the slots of every position the row attends to, in
position order.

transformers' decoders call `cache.update(keys, values, layer_idx, kwargs=...)` in each
attention layer and attend over what it returns; `PagedStep` is that object for a decode
step. It writes the new tokens' keys and values into their slots and gathers each row's
positions into a [rows, kv_heads, longest, head_dim] view for the attention
implementation (sdpa or eager), with a mask that hides padding. Padding exists only in
that transient view: the pool stores tokens and nothing else. Forwards with prompt
chunks (model/paged/segment_step.py) read the pool per segment.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NULL_BLOCK = 0


class KVPool:
    """Every layer's KV slots; grows and shrinks by reallocation (rare, amortized)."""

    def __init__(self, *, layer_devices: list[str], kv_heads: int, head_dim: int,
                 dtype: torch.dtype, block_size: int, blocks: int,
                 zeroed: bool = False) -> None:
        """`zeroed`: every slot starts at zero, not only the null block's (so does a pool
        on a GPU): flex attention reads a row's last block whole, its unwritten slots
        masked, and a masked slot's garbage NaN would still reach the output (0 x NaN)."""
        self.layer_devices = layer_devices
        self.zeroed = zeroed
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.block_size = block_size
        self.keys = [self._empty(blocks, d) for d in layer_devices]
        self.values = [self._empty(blocks, d) for d in layer_devices]
        self.capacity = blocks

    def _empty(self, blocks: int, device: str) -> torch.Tensor:
        """Storage for `blocks`; on the host, unless `zeroed`, only the null block is
        written: uninitialized host memory is committed page by page as blocks are first
        written, so a pool sized for the whole budget costs what its tokens use (the gather
        path reads a slot only after writing it)."""
        shape = (self.kv_heads, blocks * self.block_size, self.head_dim)
        if self.zeroed or device.startswith("cuda"):  # device memory is committed anyway
            return torch.zeros(shape, dtype=self.dtype, device=device)
        tensor = torch.empty(shape, dtype=self.dtype, device=device)
        tensor[:, NULL_BLOCK * self.block_size:(NULL_BLOCK + 1) * self.block_size] = 0
        return tensor

    @property
    def on_host(self) -> bool:
        return all(device == "cpu" for device in self.layer_devices)

    @property
    def bytes_per_block(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        per_layer = self.block_size * self.kv_heads * self.head_dim * element
        return 2 * len(self.layer_devices) * per_layer

    def resize(self, blocks: int) -> None:
        """Reallocate to `blocks`, keeping the contents of the blocks both sizes hold."""
        keep = min(blocks, self.capacity) * self.block_size
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = self._empty(blocks, self.layer_devices[layer])
                new[:, :keep] = old[:, :keep]
                store[layer] = new
                del old
        self.capacity = blocks

    def _slots(self, blocks: list[int], device: str) -> torch.Tensor:
        ids = torch.tensor(blocks, dtype=torch.long)
        slots = ids[:, None] * self.block_size + torch.arange(self.block_size)
        return slots.reshape(-1).to(device)

    def copy_blocks(self, sources: list[int], targets: list[int]) -> None:
        for store in (self.keys, self.values):
            for layer, tensor in enumerate(store):
                device = self.layer_devices[layer]
                tensor[:, self._slots(targets, device)] = tensor[:, self._slots(sources, device)]

    def save(self, blocks: list[int], device: str) -> SavedBlocks:
        """A copy of `blocks` on `device` (pinned host memory when the pool is on a GPU)."""
        pin = device == "cpu" and any(d.startswith("cuda") for d in self.layer_devices)
        keys, values = [], []
        for store, out in ((self.keys, keys), (self.values, values)):
            for layer, tensor in enumerate(store):
                part = tensor[:, self._slots(blocks, self.layer_devices[layer])]
                copy = torch.empty(part.shape, dtype=part.dtype, device=device, pin_memory=pin)
                copy.copy_(part)
                out.append(copy)
        return SavedBlocks(keys, values, len(blocks))

    def restore(self, saved: SavedBlocks, blocks: list[int]) -> None:
        for store, parts in ((self.keys, saved.keys), (self.values, saved.values)):
            for layer, tensor in enumerate(store):
                device = self.layer_devices[layer]
                tensor[:, self._slots(blocks, device)] = parts[layer].to(device)

    def all_finite(self, slots: torch.Tensor) -> bool:
        """Whether the KV in `slots` is finite (check written slots only: the rest of a
        block is uninitialized memory and may hold anything)."""
        for store in (self.keys, self.values):
            for layer, tensor in enumerate(store):
                part = tensor[:, slots.to(self.layer_devices[layer])]
                if not bool(torch.isfinite(part).all()):
                    return False
        return True


@dataclass
class SavedBlocks:
    """Blocks copied out of the pool (a swapped-out sequence, an offloaded session)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    blocks: int

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class RowSlots:
    """One sequence in a forward: where its new tokens go, and every position it reads."""

    write: torch.Tensor  # slot of each new token, in order (int64)
    read: torch.Tensor  # slot of every position attended to (past then new), in order

    @property
    def start(self) -> int:
        """Position of the first new token."""
        return len(self.read) - len(self.write)


class PagedStep:
    """The `cache` a decode forward gets (one new token per sequence, one sequence per
    row): writes the new KV to its slots, returns every row's gathered KV, padded to the
    longest row and masked. Its tensors have fixed shapes for a (rows, keys) bucket, so a
    captured CUDA graph replays it (model/paged/decode_graphs.py). Prompt chunks, and decode
    rows beside them, go through model/paged/segment_step.py instead."""

    @classmethod
    def decode(cls, pool: KVPool, tables: list[list[int]], lengths: list[int],
               dtype: torch.dtype, offsets: list[int] | None = None, *,
               keys: int | None = None) -> PagedStep:
        """One new token per sequence, at slot `lengths[b]` of `tables[b]`'s blocks and
        position `lengths[b] + offsets[b]` (a multimodal rope's offset after its media):
        built with a few tensor operations whatever the batch size. `keys`, when given,
        pads every row's reads to that many (a captured graph's fixed shape); an empty
        table is a padding row, which reads and writes the null block."""
        step = cls()
        size, rows = pool.block_size, len(tables)
        length = torch.tensor(lengths, dtype=torch.long)
        step.pool = pool
        step.keys = int(length.max()) + 1 if keys is None else keys
        width = max(max(len(t) for t in tables), -(-step.keys // size))
        table = torch.zeros((rows, width), dtype=torch.long)  # padded with the zero block
        for b, blocks in enumerate(tables):
            table[b, :len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        slots = (table[:, :, None] * size + torch.arange(size)).reshape(rows, -1)
        read = slots[:, :step.keys]
        allowed = torch.arange(step.keys)[None, :] <= length[:, None]
        read = torch.where(allowed, read, NULL_BLOCK * size)
        step._write_slots = read.gather(1, length[:, None]).reshape(-1)
        step._read = read.reshape(-1)
        step.positions = length[:, None] if offsets is None else (
            length + torch.tensor(offsets, dtype=torch.long))[:, None]
        mask = torch.zeros((rows, 1, 1, step.keys), dtype=dtype)
        step.mask = mask.masked_fill(~allowed[:, None, None, :], torch.finfo(dtype).min)
        step._on = {}
        return step

    def to(self, device: torch.device) -> None:
        """Keep every tensor of the step on `device` (a captured graph's inputs)."""
        self.positions, self.mask = self.positions.to(device), self.mask.to(device)
        self._write_slots = self._write_slots.to(device)
        self._read = self._read.to(device)
        self._on = {str(device): (self._write_slots, self._read)}

    def load(self, other: PagedStep) -> None:
        """Copy a step of the same shape into this one's tensors, in place."""
        for mine, theirs in ((self.positions, other.positions), (self.mask, other.mask),
                             (self._write_slots, other._write_slots), (self._read, other._read)):
            mine.copy_(theirs, non_blocking=True)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = (self._write_slots.to(device), self._read.to(device))
        return self._on[key]

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor,
              layer_idx: int) -> None:
        """The new tokens' keys and values [rows, kv_heads, 1, dim] into their slots."""
        batch, heads, _, dim = key_states.shape
        write_slots, _ = self._indices(key_states.device)
        for new, store in ((key_states, self.pool.keys), (value_states, self.pool.values)):
            pool = store[layer_idx]
            pool.index_copy_(1, write_slots, new.transpose(0, 1).reshape(heads, batch, dim)
                             .to(pool.dtype))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               kwargs: dict | None = None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
        self.write(key_states, value_states, layer_idx)
        batch, heads, _, dim = key_states.shape
        _, read = self._indices(key_states.device)
        # in the keys' own type: the pool may hold a narrower one (model/precision.py
        # `kv_dtype`)
        gathered = [store[layer_idx].index_select(1, read).view(heads, batch, self.keys, dim)
                    .transpose(0, 1).to(key_states.dtype)
                    for store in (self.pool.keys, self.pool.values)]
        return gathered[0], gathered[1]
