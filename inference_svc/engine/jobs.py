"""What travels between the asyncio side and the model thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.modular import DecodedMedia
from inference_svc.types import Delta, Event, Finished, GenerationRequest


class Cancellation:
    """Why a running request must stop, set from any thread."""

    def __init__(self, deadline: float | None) -> None:
        self._event = threading.Event()
        self.deadline = deadline

    def cancel(self) -> None:
        self._event.set()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    @property
    def requested(self) -> bool:
        return self._event.is_set() or self.expired


@dataclass(frozen=True)
class Admission:
    mode: str = "open"  # "open" | "limited" | "paused"
    max_running: int = 0
    expires_at: float | None = None  # time.monotonic(); a restriction lapses then

    @property
    def lapsed(self) -> bool:
        return self.expires_at is not None and time.monotonic() > self.expires_at


@dataclass
class Failed:
    error: BaseException


@dataclass
class RunningInfo:
    request_id: str
    session_id: str
    modalities: set[str]
    prompt_tokens: int
    generated_tokens: int = 0
    priority: int = 0


class RequestHandle:
    """The asyncio side of one request: its event stream and a cancel switch."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.cancellation = Cancellation(request.deadline)
        self._loop = loop
        self._events: asyncio.Queue[Event | Failed] = asyncio.Queue()
        self.ended = False  # its final event (Finished or Failed) has been pushed

    def push(self, event: Event | Failed) -> None:
        """Thread-safe: called from the model thread (and by the watchdog)."""
        if isinstance(event, Finished | Failed):
            self.ended = True
        # a closed event loop (process exit) raises RuntimeError: nobody is listening then
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    def cancel(self) -> None:
        self.cancellation.cancel()

    async def events(self) -> AsyncIterator[Event]:
        """The request's events; text deltas of one choice that are already waiting are
        merged into one, so a reader that falls behind (many streams, one event loop)
        catches up with fewer, larger messages instead of one per token."""
        held: Event | Failed | None = None
        while True:
            item = held if held is not None else await self._events.get()
            held = None
            while isinstance(item, Delta) and not self._events.empty():
                following = self._events.get_nowait()
                if not (isinstance(following, Delta) and following.index == item.index):
                    held = following
                    break
                item = Delta(item.text + following.text, item.reasoning + following.reasoning,
                             item.logprobs + following.logprobs, item.index)
            if isinstance(item, Failed):
                raise item.error
            yield item
            if isinstance(item, Finished):
                return


@dataclass(order=True)
class Job:
    sort_key: tuple[int, int]
    request: GenerationRequest | None = field(compare=False)  # None: stop the loop
    plan: PromptPlan | None = field(compare=False, default=None)
    media: DecodedMedia | None = field(compare=False, default=None)
    max_new_tokens: int = field(compare=False, default=0)
    handle: RequestHandle | None = field(compare=False, default=None)
    enqueued_at: float = field(compare=False, default_factory=time.monotonic)
    resume: Any = field(compare=False, default=None)  # a preempted Sequence to recompute
    info: RunningInfo | None = field(compare=False, default=None)  # set once admitted
    waiting: bool = field(compare=False, default=False)  # admission has made it wait
    reuse: Any = field(compare=False, default=None)  # KV found for it at admission
    wake: bool = field(compare=False, default=False)  # no request: wakes the loop for a task
    preempted: bool = field(compare=False, default=False)  # admitted once: never times out
