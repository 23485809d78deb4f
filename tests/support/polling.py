"""The one way tests wait for something: poll a check until it holds, fail at a deadline.

A test never sleeps a fixed time before asserting that something did not happen; it waits
for an observable that proves the condition, through these helpers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    *,
    interval: float = 0.05,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """Call `check` until it returns something truthy, and return that. Exceptions of the
    `ignoring` types count as "not yet" (a server still starting). After `timeout` seconds
    fail with an AssertionError that names `what` and the last such exception."""
    deadline = time.monotonic() + timeout
    while True:
        result, last_error = _attempt(check, ignoring)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(_late(what, timeout, last_error))
        time.sleep(interval)


async def wait_until_async(
    check: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    *,
    interval: float = 0.005,
) -> T:
    """`wait_until` inside an event loop: the loop keeps running between the checks."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(_late(what, timeout, None))
        await asyncio.sleep(interval)
    return result


def _attempt(
    check: Callable[[], T], ignoring: tuple[type[Exception], ...]
) -> tuple[T | None, Exception | None]:
    try:
        return check(), None
    except ignoring as error:
        return None, error


def _late(what: str, timeout: float, last_error: Exception | None) -> str:
    message = f"not within {timeout:g} s: {what}"
    return f"{message} (last error: {last_error!r})" if last_error else message
