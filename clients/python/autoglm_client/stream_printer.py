"""Writes a Generate stream to a terminal as it arrives."""

from __future__ import annotations

from typing import TextIO

from autoglm_client.results import ReasoningDelta, StreamEvent, TextDelta

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


class StreamPrinter:
    """Prints deltas at once (flushing each); reasoning is dimmed on a terminal and wrapped
    in <think>...</think> elsewhere, so that piped output stays readable."""

    def __init__(self, out: TextIO, *, dim: bool) -> None:
        self._out = out
        self._open, self._close = (_DIM, _RESET + "\n") if dim else ("<think>\n", "\n</think>\n")
        self._in_reasoning = False
        self._wrote_anything = False
        self._ends_with_newline = True

    def write(self, event: StreamEvent) -> None:
        match event:
            case ReasoningDelta(text=delta):
                if not self._in_reasoning:
                    self._emit(self._open)
                    self._in_reasoning = True
                self._emit(delta)
            case TextDelta(text=delta):
                self._leave_reasoning()
                self._emit(delta)

    def finish(self) -> None:
        """Close any open reasoning block and end the reply with a newline."""
        self._leave_reasoning()
        if self._wrote_anything and not self._ends_with_newline:
            self._emit("\n")

    def _leave_reasoning(self) -> None:
        if self._in_reasoning:
            self._emit(self._close)
            self._in_reasoning = False

    def _emit(self, value: str) -> None:
        if not value:
            return
        self._out.write(value)
        self._out.flush()
        self._wrote_anything = True
        self._ends_with_newline = value.endswith("\n")
