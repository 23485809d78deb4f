"""Readings from a recorded or scripted trace, and a recorder that writes that format.

Trace format, JSON lines, one reading per line:
    {"t": 0.0, "device": "GPU-0", "used": 1000, "total": 4000}
`t` is seconds from the start of the trace; `free` defaults to total - used; a line
with `"ok": false` (and an optional "error") is a failed reading.
"""

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from memory_daemon.errors import ProbeUnavailableError
from memory_daemon.readings import DeviceReading


@dataclass(frozen=True, slots=True)
class TraceRow:
    offset: float
    device: str
    used: int
    total: int
    free: int
    ok: bool = True
    error: str = ""


def _parse_row(line: str, number: int, path: Path) -> TraceRow:
    try:
        raw = json.loads(line)
        ok = bool(raw.get("ok", True))
        total = int(raw.get("total", 0))
        used = int(raw.get("used", 0))
        row = TraceRow(
            offset=float(raw["t"]),
            device=str(raw["device"]),
            used=used,
            total=total,
            free=int(raw.get("free", total - used)),
            ok=ok,
            error=str(raw.get("error", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ProbeUnavailableError(f"{path}:{number}: bad trace line: {exc!r}") from exc
    if not math.isfinite(row.offset) or row.offset < 0:
        raise ProbeUnavailableError(f"{path}:{number}: t must be a finite number >= 0")
    if ok and (total <= 0 or used < 0 or used > total):
        raise ProbeUnavailableError(f"{path}:{number}: need 0 <= used <= total and total > 0")
    return row


def load_trace(path: str | Path) -> list[TraceRow]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ProbeUnavailableError(f"cannot read trace {path}: {exc.strerror}") from exc
    rows = [
        _parse_row(line, number, path)
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not rows:
        raise ProbeUnavailableError(f"trace {path} has no readings")
    return sorted(rows, key=lambda row: row.offset)


class ReplayProbe:
    """Plays a trace against a clock: each device reads as its latest row at or before now.

    A reading's timestamp is its row's time on the clock, so a row re-read by a faster
    poll is not a fresh sample. `speed` scales trace time (2.0 plays twice as fast).
    """

    def __init__(
        self,
        rows: list[TraceRow],
        clock: Callable[[], float] | None = None,
        speed: float = 1.0,
    ) -> None:
        self._rows = rows
        self._clock = clock or time.monotonic
        self._speed = speed
        self._start = self._clock()
        self._cursor = 0
        self._latest: dict[str, TraceRow] = {}

    @property
    def exhausted(self) -> bool:
        """Every row has been played."""
        return self._cursor >= len(self._rows)

    @property
    def next_offset_seconds(self) -> float | None:
        """Clock seconds from now until the next row plays; None when exhausted."""
        if self.exhausted:
            return None
        due = self._start + self._rows[self._cursor].offset / self._speed
        return max(0.0, due - self._clock())

    def read(self) -> list[DeviceReading]:
        elapsed = (self._clock() - self._start) * self._speed
        while self._cursor < len(self._rows) and self._rows[self._cursor].offset <= elapsed:
            row = self._rows[self._cursor]
            self._latest[row.device] = row
            self._cursor += 1
        return [self._reading(row) for row in self._latest.values()]

    def _reading(self, row: TraceRow) -> DeviceReading:
        timestamp = self._start + row.offset / self._speed
        if not row.ok:
            return DeviceReading.failed(row.device, timestamp, row.error or "failed in trace")
        return DeviceReading(
            device=row.device,
            timestamp=timestamp,
            total_bytes=row.total,
            used_bytes=row.used,
            free_bytes=row.free,
        )

    def close(self) -> None:
        """Nothing to release."""


class TraceRecorder:
    """Appends readings to a JSON-lines trace that `ReplayProbe` can play back."""

    def __init__(self, sink: IO[str]) -> None:
        self._sink = sink
        self._origin: float | None = None

    def record(self, readings: list[DeviceReading]) -> None:
        for reading in readings:
            if self._origin is None:
                self._origin = reading.timestamp
            row: dict[str, object] = {
                "t": round(reading.timestamp - self._origin, 6),
                "device": reading.device,
            }
            if reading.ok:
                row.update(
                    used=reading.used_bytes, total=reading.total_bytes, free=reading.free_bytes
                )
            else:
                row.update(ok=False, error=reading.error)
            self._sink.write(json.dumps(row) + "\n")
        self._sink.flush()
