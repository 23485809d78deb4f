"""The KV ledger over a real (small, CPU) block pool: taking, sharing, caching, copying
on write, swapping, growing and shrinking."""

from __future__ import annotations

import pytest
import torch

from inference_svc.engine.kv_blocks import BlockLedger, KVExhausted
from inference_svc.model.paged.kv_pool import KVPool

SIZE = 4  # tokens per block


def ledger(budget_blocks: int = 16, min_blocks: int = 4) -> BlockLedger:
    pool = KVPool(layer_devices=["cpu", "cpu"], kv_heads=2, head_dim=3, dtype=torch.float32,
                  block_size=SIZE, blocks=1)
    return BlockLedger(pool, budget_blocks=budget_blocks, min_blocks=min_blocks)


def fill(kv: BlockLedger, owner: str, value: float) -> None:
    """Write `value` into every slot of the owner's blocks, in every layer."""
    slots = kv.slots(owner, 0, len(kv.table(owner)) * kv.block_size)
    for store in (kv.pool.keys, kv.pool.values):
        for tensor in store:
            tensor[:, slots] = value


def content_of(kv: BlockLedger, owner: str) -> torch.Tensor:
    return kv.pool.keys[1][:, kv.slots(owner, 0, len(kv.table(owner)) * SIZE)]


def test_blocks_are_taken_as_tokens_are_appended_and_freed_on_release():
    kv = ledger()
    kv.extend("a", 1)
    assert len(kv.table("a")) == 1
    kv.extend("a", SIZE)
    assert len(kv.table("a")) == 1  # still fits the first block
    kv.extend("a", SIZE + 1)
    assert len(kv.table("a")) == 2
    assert kv.account().held_blocks == 2
    assert kv.release("a") == 2
    account = kv.account()
    assert account.held_blocks == 0 and account.cached_blocks == 0


def test_equal_prefixes_are_found_by_content_and_held_once():
    kv = ledger()
    content = list(range(10))  # two full blocks and a partial one
    kv.extend("first", len(content))
    fill(kv, "first", 7.0)
    kv.seal("first", content, len(content))
    found = kv.match(content[:9])
    assert found == kv.table("first")[:2]
    kv.adopt("second", found)
    account = kv.account()
    assert account.held_blocks == 3 and account.shared_blocks == 2
    assert kv.match([99, *content[1:]]) == []  # other content, other blocks


def test_a_prefix_nobody_holds_stays_cached_until_its_space_is_needed():
    kv = ledger(budget_blocks=4, min_blocks=4)  # three usable blocks
    content = list(range(8))
    kv.extend("done", 8)
    kv.seal("done", content, 8)
    kv.release("done")
    assert kv.account().cached_blocks == 2
    kv.adopt("again", kv.match(content))  # found again, nothing recomputed
    assert kv.account().cached_blocks == 0
    kv.release("again")
    kv.extend("big", 3 * SIZE)  # needs every block: the cached ones are evicted
    assert kv.account().cached_blocks == 0
    assert kv.match(content) == []


def test_prefixes_computed_side_by_side_are_merged_when_sealed():
    kv = ledger()
    content = list(range(8))
    for owner in ("x", "y"):
        kv.extend(owner, 8)
        fill(kv, owner, 1.0)
    assert kv.account().held_blocks == 4
    kv.seal("x", content, 8)
    kv.seal("y", content, 8)
    assert kv.table("x") == kv.table("y")
    account = kv.account()
    assert account.held_blocks == 2 and account.shared_blocks == 2


def test_a_shared_block_is_copied_before_it_is_written():
    kv = ledger()
    content = list(range(6))
    kv.extend("session", 6)
    fill(kv, "session", 3.0)
    kv.seal("session", content, 6)
    kv.adopt("turn", kv.hold(kv.table("session")))
    kv.writable_from("turn", 5)  # the second block is partial and shared: copied
    assert kv.table("turn")[0] == kv.table("session")[0]
    assert kv.table("turn")[1] != kv.table("session")[1]
    assert torch.equal(content_of(kv, "turn"), content_of(kv, "session"))
    slot = kv.slots("turn", 5, 6)
    kv.pool.keys[1][:, slot] = -1.0
    assert bool((content_of(kv, "session") == 3.0).all())


def test_a_request_that_does_not_fit_takes_nothing():
    kv = ledger(budget_blocks=4, min_blocks=4)
    kv.extend("a", 2 * SIZE)
    with pytest.raises(KVExhausted):
        kv.extend("b", 2 * SIZE)
    assert kv.account().held_blocks == 2
    assert not kv.can_take(2) and kv.can_take(1)


def test_swapped_blocks_come_back_with_their_contents():
    kv = ledger()
    kv.extend("long", 3 * SIZE)
    fill(kv, "long", 5.0)
    before = content_of(kv, "long").clone()
    copied = kv.swap_out("long")
    account = kv.account()
    assert account.held_blocks == 0 and account.swapped_bytes == copied > 0
    kv.extend("other", 3 * SIZE)  # the freed blocks are used meanwhile
    fill(kv, "other", -2.0)
    kv.swap_in("long")
    assert torch.equal(content_of(kv, "long"), before)
    assert kv.account().swapped_bytes == 0


def test_the_pool_grows_on_demand_and_shrinks_when_blocks_are_let_go():
    kv = ledger(budget_blocks=64, min_blocks=4)
    assert kv.pool.capacity == 1
    kv.extend("a", 2 * SIZE)
    kv.extend("b", 30 * SIZE)
    grown = kv.pool.capacity
    assert grown >= 33
    fill(kv, "a", 9.0)
    kv.release("b")
    kept = content_of(kv, "a").clone()
    assert kv.shrink() > 0
    assert kv.pool.capacity < grown
    assert all(block < kv.pool.capacity for block in kv.table("a"))
    assert torch.equal(content_of(kv, "a"), kept)
    kv.extend("c", 10 * SIZE)  # it grows again
    assert kv.account().held_blocks == 12


def test_a_host_pool_sized_for_the_whole_budget_costs_only_the_blocks_written():
    from inference_svc.process_memory import rss_bytes

    pool = KVPool(layer_devices=["cpu"] * 4, kv_heads=4, head_dim=64, dtype=torch.float32,
                  block_size=16, blocks=1)
    kv = BlockLedger(pool, budget_blocks=1024**3 // pool.bytes_per_block)
    before = rss_bytes()
    kv.extend("small", 16 * 16)  # 16 blocks of a 1 GiB pool
    fill(kv, "small", 1.0)
    assert kv.pool.capacity == kv.budget_blocks
    assert rss_bytes() - before < 200 * 1024**2
