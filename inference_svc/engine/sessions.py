"""Idle KV caches kept for reuse: per session id, and by prompt content (prefix cache).

Entries are keyed by a content sequence (token ids, with media positions replaced by
ids derived from the media's bytes), so a cache is only reused for the same content.
All bytes are measured from the tensors. Eviction is least-recently-used.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from transformers import DynamicCache

from inference_svc.engine import kv_cache

ANONYMOUS_PREFIX = "~prefix:"  # entries kept for automatic prefix caching, not for a session


@dataclass
class CachedPrefix:
    key: str
    session_id: str  # "" for an anonymous prefix entry
    content: list[int]  # content ids of the cached tokens (len == cache length)
    cache: DynamicCache
    bytes: int
    last_used: float

    @property
    def tokens(self) -> int:
        return len(self.content)

    @property
    def device(self) -> str | None:
        return kv_cache.device_of(self.cache)


@dataclass(frozen=True)
class Reuse:
    cache: DynamicCache | None  # None: the reused KV is in the owner's blocks
    tokens: int
    source: str  # "session", "prefix"


@dataclass(frozen=True)
class TrimResult:
    freed_bytes: int
    sessions: list[str]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class SessionStore:
    def __init__(self, *, idle_ttl_s: float, min_reuse_tokens: int = 16) -> None:
        self.idle_ttl_s = idle_ttl_s
        self.min_reuse_tokens = min_reuse_tokens
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._lock = threading.Lock()

    # ---- reuse ------------------------------------------------------------------

    def take(self, session_id: str, content: list[int]) -> Reuse | None:
        """Best cached prefix of `content` (at least one token is left to compute).

        The session's own entry is handed over (it will be extended and stored back);
        another entry's prefix is copied so that entry stays intact.
        """
        limit = len(content) - 1
        with self._lock:
            own = self._entries.get(session_id) if session_id else None
            best, best_len = None, 0
            for entry in self._entries.values():
                length = min(common_prefix(entry.content, content), limit)
                if length > best_len or (length == best_len and entry is own and length):
                    best, best_len = entry, length
            if best is None or best_len < self.min_reuse_tokens:
                return None
            if best is own or best.key.startswith(ANONYMOUS_PREFIX):
                del self._entries[best.key]
                if best_len < best.tokens:
                    kv_cache.truncate(best.cache, best_len)
                return Reuse(best.cache, best_len, "session" if best is own else "prefix")
            best.last_used = time.monotonic()
            return Reuse(kv_cache.prefix_copy(best.cache, best_len), best_len, "prefix")

    def put(self, session_id: str, request_id: str, content: list[int],
            cache: DynamicCache) -> int:
        """Keep `cache` (covering `content[:len]`) for reuse; returns its bytes."""
        length = kv_cache.cache_length(cache)
        key = session_id or f"{ANONYMOUS_PREFIX}{request_id}"
        entry = CachedPrefix(key, session_id, content[:length], cache,
                             kv_cache.cache_bytes(cache), time.monotonic())
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = entry
        del old
        return entry.bytes

    # ---- accounting and trimming ------------------------------------------------

    def entries(self) -> list[CachedPrefix]:
        with self._lock:
            return list(self._entries.values())

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def end(self, session_id: str) -> int | None:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        return None if entry is None else entry.bytes

    def evict_lru(self, target_bytes: int) -> TrimResult:
        """Evict least recently used entries until `target_bytes` are freed (0: all)."""
        freed, keys = 0, []
        with self._lock:
            while self._entries and (target_bytes <= 0 or freed < target_bytes):
                key, entry = self._entries.popitem(last=False)
                freed += entry.bytes
                keys.append(key)
        return TrimResult(freed, keys)

    def expire_idle(self, now: float | None = None) -> TrimResult:
        now = time.monotonic() if now is None else now
        freed, keys = 0, []
        with self._lock:
            for key in [k for k, e in self._entries.items()
                        if now - e.last_used > self.idle_ttl_s]:
                freed += self._entries.pop(key).bytes
                keys.append(key)
        return TrimResult(freed, keys)

    def truncate_all(self, max_tokens: int) -> TrimResult:
        freed, keys = 0, []
        with self._lock:
            for entry in self._entries.values():
                if entry.tokens > max_tokens:
                    kv_cache.truncate(entry.cache, max_tokens)
                    entry.content = entry.content[:max_tokens]
                    new_bytes = kv_cache.cache_bytes(entry.cache)
                    freed += entry.bytes - new_bytes
                    entry.bytes = new_bytes
                    keys.append(entry.key)
        return TrimResult(freed, keys)

    def offload_to(self, device: str) -> TrimResult:
        """Move idle caches living elsewhere (a GPU) to `device`; bytes moved."""
        moved, keys = 0, []
        with self._lock:
            for entry in self._entries.values():
                if kv_cache.device_of(entry.cache) not in (None, device):
                    kv_cache.move(entry.cache, device)
                    moved += entry.bytes
                    keys.append(entry.key)
        return TrimResult(moved, keys)
