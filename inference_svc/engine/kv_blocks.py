"""The KV ledger: the one account of KV blocks and who holds them.

Owners (a running sequence, a session) hold block tables: lists of block ids in
position order. A block is referenced by every owner whose table lists it, so a prefix
shared by 32 sequences is stored and counted once. A full block is keyed by its
content (the content ids of its tokens, chained to the block before it); when its last
owner lets go it stays as a cached block, found again by content and reused without
recomputation until the space is needed (least recently used first). A block about to
be written while someone else can read it is copied first (copy on write).

The pool starts small and grows up to the KV budget (on a GPU by doubling; on the host
at once, its pages committed only as blocks are written); `shrink` moves the live
blocks down and gives the rest back, so freeing KV frees memory. Swapped-out blocks
(a preempted sequence, an offloaded session) live in host memory, outside the budget.

Checks and acts are apart: `can_take(n)` says whether n blocks can be had without
touching anyone's blocks; `take`/`extend` acts. Every byte count of KV anywhere in the
service (admission, the control account, metrics, the pressure signal, trims) is read
from here.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from inference_svc.model.paged.kv_pool import NULL_BLOCK, KVPool, SavedBlocks

GROWTH_FACTOR = 2


@dataclass(frozen=True)
class KVAccount:
    """A snapshot of the ledger, in blocks and bytes."""

    block_size: int
    bytes_per_block: int
    budget_blocks: int
    capacity_blocks: int  # allocated in the pool now
    held_blocks: int  # referenced by at least one owner (shared ones once)
    shared_blocks: int  # referenced by more than one owner
    cached_blocks: int  # held by nobody, kept for reuse by content
    swapped_bytes: int  # copied out to host memory
    blocks_by_owner: dict[str, int]

    @property
    def held_bytes(self) -> int:
        return self.held_blocks * self.bytes_per_block

    @property
    def cached_bytes(self) -> int:
        return self.cached_blocks * self.bytes_per_block

    @property
    def used_bytes(self) -> int:
        """Bytes of the budget in use: held plus cached (cached can be evicted)."""
        return (self.held_blocks + self.cached_blocks) * self.bytes_per_block

    @property
    def budget_bytes(self) -> int:
        return self.budget_blocks * self.bytes_per_block

    @property
    def shared_bytes(self) -> int:
        return self.shared_blocks * self.bytes_per_block

    @property
    def free_pool_bytes(self) -> int:
        """Bytes of the allocated pool that hold no token (its null block aside): what a
        GPU pool sized at start-up has taken from the card but not yet used."""
        return (self.capacity_blocks - 1 - self.held_blocks - self.cached_blocks) * (
            self.bytes_per_block)


def block_hash(parent: bytes, content: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", content).tobytes(), digest_size=16).digest()


class BlockLedger:
    def __init__(self, pool: KVPool, *, budget_blocks: int, min_blocks: int = 16) -> None:
        if budget_blocks < 2:
            raise ValueError("the KV budget must hold at least two blocks")
        self.pool = pool
        self.block_size = pool.block_size
        self.budget_blocks = budget_blocks
        self.min_blocks = min(min_blocks, budget_blocks)
        self._refs = [0] * pool.capacity
        self._refs[NULL_BLOCK] = 1  # never handed out
        self._held = 0  # blocks with a reference (the null block aside)
        self._shared = 0  # blocks with more than one
        self._free = list(range(pool.capacity - 1, NULL_BLOCK, -1))  # pop() gives low ids
        self._cached: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._hash_of: dict[int, bytes] = {}
        self._by_hash: dict[bytes, int] = {}
        self.tables: dict[str, list[int]] = {}
        self.swapped: dict[str, SavedBlocks] = {}

    # ---- checks ----------------------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        return self.pool.bytes_per_block

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def available(self) -> int:
        """Blocks that can be had without taking any owner's: free, growth, cached."""
        return (len(self._free) + (self.budget_blocks - self.pool.capacity)
                + len(self._cached))

    def can_take(self, blocks: int) -> bool:
        return blocks <= self.available()

    def account(self) -> KVAccount:
        return KVAccount(
            self.block_size, self.bytes_per_block, self.budget_blocks - 1,
            self.pool.capacity, self._held, self._shared, len(self._cached),
            sum(s.bytes for s in self.swapped.values()),
            {owner: len(table) for owner, table in self.tables.items()},
        )

    # ---- blocks ------------------------------------------------------------------------

    def _one(self) -> int:
        if not self._free and self.pool.capacity < self.budget_blocks:
            self._grow()
        if self._free:
            block = self._free.pop()
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._by_hash[self._hash_of.pop(block)]
        else:
            raise KVExhausted()
        self._refs[block] = 1
        self._held += 1
        return block

    def preallocate(self, blocks: int) -> None:
        """Allocate the pool at `blocks` now and make that the budget, where it is less:
        a GPU pool sized once at start-up (engine/kv_pool_sizing.py)."""
        self.budget_blocks = min(self.budget_blocks, blocks)
        self.min_blocks = min(self.min_blocks, self.budget_blocks)
        if self.pool.capacity < self.budget_blocks:
            self._resize_to(self.budget_blocks)

    def _grow(self) -> None:
        """More blocks: on the host, the whole budget at once (its pages are committed
        only as blocks are written, so growing in steps would only add copies); on a
        GPU, double (device memory is committed when allocated; a pool preallocated at
        start-up grows only after a trim gave some back)."""
        if self.pool.on_host:
            new = self.budget_blocks
        else:
            new = min(self.budget_blocks, max(self.pool.capacity * GROWTH_FACTOR,
                                              self.min_blocks))
        self._resize_to(new)

    def _resize_to(self, new: int) -> None:
        old = self.pool.capacity
        self.pool.resize(new)
        self._refs.extend([0] * (new - old))
        self._free = list(range(new - 1, old - 1, -1)) + self._free

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._cached.pop(block, None)
            self._held += 1
        elif self._refs[block] == 1:
            self._shared += 1
        self._refs[block] += 1

    def _drop(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 1:
            self._shared -= 1
        if self._refs[block]:
            return
        self._held -= 1
        if block in self._hash_of:
            self._cached[block] = None
        else:
            self._free.append(block)

    def _forget(self, block: int) -> None:
        """A cached block nobody holds goes back to the free list."""
        if block in self._cached:
            del self._cached[block]
            del self._by_hash[self._hash_of.pop(block)]
            self._free.append(block)

    # ---- owners ------------------------------------------------------------------------

    def table(self, owner: str) -> list[int]:
        return self.tables[owner]

    def adopt(self, owner: str, blocks: list[int]) -> None:
        """`owner` starts with a table of `blocks` (already held on its behalf)."""
        self.tables[owner] = list(blocks)

    def extend(self, owner: str, tokens: int) -> None:
        """Make `owner`'s table hold `tokens` positions; KVExhausted when it cannot."""
        table = self.tables.setdefault(owner, [])
        taken: list[int] = []
        try:
            while len(table) + len(taken) < self.blocks_for(tokens):
                taken.append(self._one())
        except KVExhausted:
            for block in taken:
                self._drop(block)
            raise
        table.extend(taken)

    def writable_from(self, owner: str, position: int) -> None:
        """Copy on write: the block holding `position` becomes this owner's alone."""
        table = self.tables[owner]
        index = position // self.block_size
        if index >= len(table):
            return
        block = table[index]
        if self._refs[block] == 1 and block not in self._hash_of:
            return
        copy = self._one()
        self.pool.copy_blocks([block], [copy])
        table[index] = copy
        self._drop(block)

    def slots(self, owner: str, start: int, end: int) -> torch.Tensor:
        """The pool slots of `owner`'s positions [start, end) (int64)."""
        size = self.block_size
        first, last = start // size, -(-end // size)
        blocks = torch.tensor(self.tables[owner][first:last], dtype=torch.long)
        slots = (blocks[:, None] * size + torch.arange(size)).reshape(-1)
        return slots[start - first * size:end - first * size]

    def seal(self, owner: str, content: list[int], length: int) -> None:
        """Key the owner's full blocks within its first `length` positions by content.

        A block whose content another block already holds is replaced by that one (the
        two are equal), so equal prefixes computed side by side end up stored once.
        """
        table, size = self.tables[owner], self.block_size
        parent = b""
        for index in range(min(length // size, len(table))):
            key = block_hash(parent, content[index * size:(index + 1) * size])
            block = table[index]
            known = self._by_hash.get(key)
            if known is None and block not in self._hash_of:
                self._by_hash[key] = block
                self._hash_of[block] = key
            elif known is not None and known != block and self._hash_of.get(block) != key:
                self._hold(known)
                table[index] = known
                self._drop(block)
            parent = key

    def match(self, content: list[int]) -> list[int]:
        """The cached or held blocks that hold a prefix of `content`, each now held once
        more on the caller's behalf (hand them to `adopt`)."""
        size, parent, found = self.block_size, b"", []
        for index in range(len(content) // size):
            parent = block_hash(parent, content[index * size:(index + 1) * size])
            block = self._by_hash.get(parent)
            if block is None:
                break
            found.append(block)
        for block in found:
            self._hold(block)
        return found

    def let_go(self, blocks: list[int]) -> None:
        for block in blocks:
            self._drop(block)

    def hold(self, blocks: list[int]) -> list[int]:
        for block in blocks:
            self._hold(block)
        return list(blocks)

    def release(self, owner: str, *, keep_cached: bool = True) -> int:
        """`owner` lets go of its table; returns the blocks this freed for others.
        Its full blocks stay cached for reuse unless `keep_cached` is False."""
        table = self.tables.pop(owner, [])
        self.swapped.pop(owner, None)
        freed = 0
        for block in table:
            self._drop(block)
            if self._refs[block] == 0:
                freed += 1
                if not keep_cached:
                    self._forget(block)
        return freed

    def truncate(self, owner: str, tokens: int) -> int:
        """Keep the blocks that hold the first `tokens` positions; returns blocks freed."""
        table = self.tables[owner]
        keep = self.blocks_for(tokens)
        dropped, self.tables[owner] = table[keep:], table[:keep]
        for block in dropped:
            self._drop(block)
            self._forget(block)
        return len(dropped)

    def rename(self, owner: str, new_owner: str) -> None:
        self.tables[new_owner] = self.tables.pop(owner)

    def all_finite(self, owner: str, length: int) -> bool:
        """Whether `owner`'s first `length` positions hold finite KV."""
        return self.pool.all_finite(self.slots(owner, 0, length))

    # ---- memory --------------------------------------------------------------------------

    def evict_cached(self, blocks: int) -> int:
        """Forget up to `blocks` cached blocks (least recently used first; 0: all)."""
        evicted = 0
        while self._cached and (blocks <= 0 or evicted < blocks):
            block = next(iter(self._cached))
            self._forget(block)
            evicted += 1
        return evicted

    def swap_out(self, owner: str, device: str = "cpu") -> int:
        """Copy `owner`'s blocks to host memory and let go of them; bytes copied."""
        saved = self.pool.save(self.tables[owner], device)
        self.release(owner)
        self.swapped[owner] = saved
        return saved.bytes

    def swap_in(self, owner: str) -> None:
        """Bring swapped blocks back into fresh blocks; KVExhausted when they do not fit."""
        saved = self.swapped[owner]
        self.extend(owner, saved.blocks * self.block_size)
        self.pool.restore(saved, self.tables[owner])
        del self.swapped[owner]

    def shrink(self) -> int:
        """Move live blocks down and give back the pool beyond them; blocks given back."""
        live = sorted(b for b in range(1, self.pool.capacity)
                      if self._refs[b] > 0 or b in self._cached)
        target = self.min_blocks
        while target < len(live) + 1:
            target *= GROWTH_FACTOR
        target = min(target, self.budget_blocks)
        if target >= self.pool.capacity:
            return 0
        spare = iter(sorted(set(range(1, target)) - set(live)))
        moves = {b: next(spare) for b in live if b >= target}
        if moves:
            self.pool.copy_blocks(list(moves), list(moves.values()))
            for table in self.tables.values():
                table[:] = [moves.get(b, b) for b in table]
            for old, new in moves.items():
                self._refs[new] = self._refs[old]
                if old in self._hash_of:
                    key = self._hash_of.pop(old)
                    self._hash_of[new] = key
                    self._by_hash[key] = new
            self._cached = OrderedDict((moves.get(b, b), None) for b in self._cached)
        given_back = self.pool.capacity - target
        self.pool.resize(target)
        del self._refs[target:]
        self._free = sorted((b for b in range(1, target)
                             if self._refs[b] == 0 and b not in self._cached), reverse=True)
        return given_back


class KVExhausted(Exception):
    """No block is free, none can be grown and none is cached."""
