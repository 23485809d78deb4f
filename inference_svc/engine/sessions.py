"""Sessions over the KV ledger: a session is a reference to blocks, not a copy of KV.

When a request of a session finishes, the session takes over its block table (the
previous turn's table is let go; blocks both share stay). The next turn finds its
prefix in the session's table, and any request finds full blocks of any earlier prompt
by content (automatic prefix caching: blocks nobody holds stay cached until their space
is needed). The block where the new tokens start is copied first if anyone else can
read it. All byte counts come from the ledger; only the model thread calls in here.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from inference_svc.engine.kv_blocks import BlockLedger, KVExhausted

SESSION = "session:"


@dataclass(frozen=True)
class Reuse:
    """Positions a new owner starts with, already computed (in its blocks)."""

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


@dataclass
class SessionEntry:
    key: str  # the session id
    content: list[int]  # content ids of the positions its blocks hold
    bytes: int
    last_used: float
    device: str

    @property
    def session_id(self) -> str:
        return self.key

    @property
    def tokens(self) -> int:
        return len(self.content)


class SessionStore:
    def __init__(self, ledger: BlockLedger, *, idle_ttl_s: float, device: str,
                 prefix_caching: bool = True, min_reuse_tokens: int = 16) -> None:
        self.ledger = ledger
        self.idle_ttl_s = idle_ttl_s
        self.device = device
        self.prefix_caching = prefix_caching
        self.min_reuse_tokens = min_reuse_tokens
        self._entries: OrderedDict[str, SessionEntry] = OrderedDict()  # LRU first
        self._lock = threading.Lock()  # guards _entries for readers on other threads

    # ---- reuse ------------------------------------------------------------------

    def take(self, session_id: str, content: list[int], owner: str) -> Reuse | None:
        """Give `owner` a table holding the longest known prefix of `content` (one token
        at least is left to compute); None when less than `min_reuse_tokens` is known."""
        limit = len(content) - 1
        ledger = self.ledger
        entry = self._entries.get(session_id) if session_id else None
        own = 0
        if entry is not None and self._resident(entry):
            own = min(common_prefix(entry.content, content), limit)
        found = ledger.match(content[:limit]) if self.prefix_caching else []
        if own > len(found) * ledger.block_size:
            ledger.let_go(found)
            blocks = ledger.hold(ledger.table(SESSION + session_id)[:ledger.blocks_for(own)])
            tokens, source = own, "session"
        else:
            blocks, tokens = found, len(found) * ledger.block_size
            source = "session" if own and own >= tokens else "prefix"
        if tokens < self.min_reuse_tokens:
            ledger.let_go(blocks)
            return None
        ledger.adopt(owner, blocks)
        ledger.writable_from(owner, tokens)
        if source == "session":  # the session's own blocks were used
            entry.last_used = time.monotonic()
        return Reuse(tokens, source)

    def _resident(self, entry: SessionEntry) -> bool:
        """The session's blocks are in the pool (brought back if they were offloaded)."""
        if entry.device == self.device:
            return True
        try:
            self.ledger.swap_in(SESSION + entry.key)
        except KVExhausted:
            return False
        entry.device = self.device
        return True

    def put(self, session_id: str, owner: str, content: list[int], length: int) -> None:
        """`owner` (a finished request) hands its blocks, holding `content[:length]`, to
        its session; without a session they stay cached by content (or are freed)."""
        ledger = self.ledger
        if self.prefix_caching:
            ledger.seal(owner, content, length)
        if not session_id:
            ledger.release(owner, keep_cached=self.prefix_caching)
            return
        key = SESSION + session_id
        ledger.release(key, keep_cached=self.prefix_caching)
        ledger.rename(owner, key)
        ledger.truncate(key, length)
        entry = SessionEntry(session_id, content[:length],
                             len(ledger.table(key)) * ledger.bytes_per_block,
                             time.monotonic(), self.device)
        with self._lock:
            self._entries.pop(session_id, None)
            self._entries[session_id] = entry

    # ---- accounting and trimming ------------------------------------------------

    def entries(self) -> list[SessionEntry]:
        with self._lock:
            return list(self._entries.values())

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.bytes for e in self._entries.values())

    def _drop(self, session_id: str) -> int:
        with self._lock:
            entry = self._entries.pop(session_id, None)
        if entry is None:
            return -1
        freed = self.ledger.release(SESSION + session_id, keep_cached=False)
        return freed * self.ledger.bytes_per_block if entry.device == self.device else entry.bytes

    def end(self, session_id: str) -> int | None:
        with self._lock:
            entry = self._entries.get(session_id)
        if entry is None:
            return None
        self._drop(session_id)
        return entry.bytes

    def evict_lru(self, target_bytes: int) -> TrimResult:
        """Free at least `target_bytes` (0: everything idle): cached blocks first, then
        sessions, least recently used first."""
        ledger, per_block = self.ledger, self.ledger.bytes_per_block
        wanted = -(-target_bytes // per_block) if target_bytes > 0 else 0
        freed = ledger.evict_cached(wanted) * per_block
        keys: list[str] = []
        while target_bytes <= 0 or freed < target_bytes:
            with self._lock:
                if not self._entries:
                    break
                oldest = next(iter(self._entries))
            freed += max(self._drop(oldest), 0)
            keys.append(oldest)
        return TrimResult(freed, keys)

    def expire_idle(self, now: float | None = None) -> TrimResult:
        now = time.monotonic() if now is None else now
        with self._lock:
            stale = [k for k, e in self._entries.items() if now - e.last_used > self.idle_ttl_s]
        freed = sum(max(self._drop(key), 0) for key in stale)
        return TrimResult(freed, stale)

    def truncate_all(self, max_tokens: int) -> TrimResult:
        freed, keys = 0, []
        for entry in self.entries():
            if entry.tokens > max_tokens and entry.device == self.device:
                blocks = self.ledger.truncate(SESSION + entry.key, max_tokens)
                entry.content = entry.content[:max_tokens]
                entry.bytes -= blocks * self.ledger.bytes_per_block
                freed += blocks * self.ledger.bytes_per_block
                keys.append(entry.key)
        return TrimResult(freed, keys)

    def offload_to(self, device: str) -> TrimResult:
        """Copy idle sessions' blocks out of the pool to `device` (host memory)."""
        moved, keys = 0, []
        if device == self.device:
            return TrimResult(0, [])
        for entry in self.entries():
            if entry.device == self.device:
                moved += self.ledger.swap_out(SESSION + entry.key, device)
                entry.device = device
                keys.append(entry.key)
        return TrimResult(moved, keys)
