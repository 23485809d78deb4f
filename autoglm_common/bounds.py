"""Bounds on text that came from a client and goes back out in errors or into logs.

Error messages quote client input through `quote`; whatever builds a status, an HTTP
error body or a log line caps its text with `clip`, so no client string can make an
error larger than a client's metadata limit or a log line larger than a screen. The
inference service and the HTTP gateway both bound their answers with it.
"""

from __future__ import annotations

ECHO_CHARS = 200  # most characters of one client value an error message quotes
MESSAGE_BYTES = 1024  # most UTF-8 bytes of one message or detail field in a status


def quote(value: str, limit: int = ECHO_CHARS) -> str:
    """repr() of a client string; past `limit` characters, its start, '...' and its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def clip(text: str, max_bytes: int = MESSAGE_BYTES) -> str:
    """`text` if its UTF-8 form fits `max_bytes`; else its longest fitting start + a marker."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= max_bytes:
        return text
    marker = f"... ({len(text)} characters)"
    head = encoded[: max(0, max_bytes - len(marker))].decode("utf-8", "ignore")
    return head + marker
