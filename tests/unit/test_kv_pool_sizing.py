"""The GPU KV pool sized once at start-up: how many blocks fit each card beside what it
must keep, and the ledger allocating them at once (here on a host pool, which behaves
the same)."""

from __future__ import annotations

import pytest
import torch

from inference_svc.engine.kv_blocks import BlockLedger
from inference_svc.engine.kv_pool_sizing import (
    CardRoom,
    NoRoomForKV,
    block_bytes_by_device,
    blocks_that_fit,
)
from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.model.sizing.cards import RESERVE_FRACTION

GIB = 1024**3
MIB = 1024**2


def pool(devices: list[str]) -> KVPool:
    return KVPool(layer_devices=devices, kv_heads=2, head_dim=64, dtype=torch.float32,
                  block_size=16, blocks=1)


def test_a_block_counts_on_each_card_its_layers_share():
    split = pool(["cpu", "cpu", "cpu", "meta"])  # three layers on one device, one on another
    per_layer = split.bytes_per_block // 4
    assert block_bytes_by_device(split) == {"cpu": 3 * per_layer, "meta": per_layer}


def test_the_tightest_card_sets_the_block_count_under_the_budget():
    card = 80 * GIB
    reserve = int(card * RESERVE_FRACTION)
    rooms = [CardRoom("cuda:0", 20 * GIB, card), CardRoom("cuda:1", 12 * GIB, card)]
    block = {"cuda:0": MIB, "cuda:1": MIB}
    keep = GIB
    tight = (12 * GIB - keep - reserve) // MIB
    assert blocks_that_fit(10**9, block, rooms, keep) == tight
    assert blocks_that_fit(100, block, rooms, keep) == 100  # the operator's budget caps it


def test_a_card_without_room_for_two_blocks_is_a_start_up_error_that_says_why():
    rooms = [CardRoom("cuda:0", 2 * GIB, 24 * GIB)]
    with pytest.raises(NoRoomForKV, match=r"cuda:0 has 2.00 GiB free .* no room for a KV"):
        blocks_that_fit(1000, {"cuda:0": MIB}, rooms, GIB)


def test_a_preallocated_pool_is_its_budget_and_never_grows():
    ledger = BlockLedger(pool(["cpu"]), budget_blocks=64)
    ledger.preallocate(40)
    assert ledger.pool.capacity == 40 and ledger.budget_blocks == 40
    ledger.extend("first", 10 * 16)
    # what the memory daemon counts as free on the card: allocated, holding no token
    assert ledger.account().free_pool_bytes == (40 - 1 - 10) * ledger.bytes_per_block
    ledger.release("first", keep_cached=False)
    ledger.extend("a", 39 * 16)  # every block but the null one
    assert sorted(ledger.tables["a"]) == list(range(1, 40))
    assert ledger.pool.capacity == 40 and not ledger.can_take(1)
    assert ledger.account().budget_blocks == 39


def test_preallocation_keeps_a_smaller_budget():
    ledger = BlockLedger(pool(["cpu"]), budget_blocks=8)
    ledger.preallocate(40)
    assert ledger.pool.capacity == 8 and ledger.budget_blocks == 8
