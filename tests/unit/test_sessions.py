"""The idle KV store: reuse by content, LRU eviction, truncation, byte accounting."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from inference_svc.engine import kv_cache
from inference_svc.engine.sessions import SessionStore


def cache_of(tokens: int, layers: int = 2) -> DynamicCache:
    cache = DynamicCache()
    for layer in range(layers):
        cache.update(torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4), layer)
    return cache


def test_bytes_are_measured_from_storage_and_truncation_really_frees():
    cache = cache_of(10)
    assert kv_cache.cache_bytes(cache) == 2 * 2 * (2 * 10 * 4 * 4)
    kv_cache.truncate(cache, 4)
    assert kv_cache.cache_length(cache) == 4
    assert kv_cache.cache_bytes(cache) == 2 * 2 * (2 * 4 * 4 * 4)


def test_a_session_takes_back_its_own_cache_cropped_to_the_common_prefix():
    store = SessionStore(idle_ttl_s=60, min_reuse_tokens=2)
    content = list(range(20))
    store.put("s", "r1", content, cache_of(20))
    reuse = store.take("s", [*content[:12], 99, 98])
    assert reuse.source == "session" and reuse.tokens == 12
    assert kv_cache.cache_length(reuse.cache) == 12
    assert store.entries() == []  # handed over, not shared


def test_another_requests_prefix_is_copied_not_taken():
    store = SessionStore(idle_ttl_s=60, min_reuse_tokens=2)
    store.put("owner", "r1", list(range(20)), cache_of(20))
    reuse = store.take("", [*list(range(8)), 50])
    assert reuse.source == "prefix" and reuse.tokens == 8
    assert [e.tokens for e in store.entries()] == [20]  # the owner's entry is intact


def test_at_least_one_token_is_left_to_compute():
    store = SessionStore(idle_ttl_s=60, min_reuse_tokens=2)
    store.put("s", "r1", list(range(10)), cache_of(10))
    reuse = store.take("s", list(range(10)))
    assert reuse.tokens == 9


def test_lru_eviction_frees_oldest_first_until_the_target():
    store = SessionStore(idle_ttl_s=60)
    for name in ("a", "b", "c"):
        store.put(name, name, list(range(10)), cache_of(10))
    store.take("a", [1000, 1001])  # no match: does not touch recency
    one = store.entries()[0].bytes
    result = store.evict_lru(one + 1)
    assert result.sessions == ["a", "b"] and result.freed_bytes == 2 * one
    assert [e.key for e in store.entries()] == ["c"]


def test_idle_sessions_expire():
    store = SessionStore(idle_ttl_s=5)
    store.put("old", "r", [1, 2, 3], cache_of(3))
    entry = store.entries()[0]
    assert store.expire_idle(now=entry.last_used + 1).sessions == []
    assert store.expire_idle(now=entry.last_used + 6).sessions == ["old"]
    assert store.total_bytes() == 0


def test_offloading_to_the_host_moves_only_caches_that_live_elsewhere():
    store = SessionStore(idle_ttl_s=60)
    store.put("s", "r", list(range(5)), cache_of(5))
    assert store.offload_to("cpu").sessions == []  # already on the host
    assert kv_cache.device_of(store.entries()[0].cache) == "cpu"
