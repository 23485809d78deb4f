"""Helpers for tests that run deploy artefacts as real processes: ports, polling, HTTP."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll(check: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
        except Exception as error:  # not up yet: refused, unavailable, half-written file
            result, last_error = None, error
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what} (last error: {last_error!r})")
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
