"""What a probe reports: one reading per device per tick."""

from dataclasses import dataclass, replace
from typing import Protocol


@dataclass(frozen=True, slots=True)
class DeviceReading:
    """Memory of one device at one instant; `ok=False` readings carry only an error."""

    device: str
    timestamp: float
    total_bytes: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    ok: bool = True
    error: str = ""

    @property
    def used_fraction(self) -> float:
        """Share of the device that is not free (free is the headroom signal)."""
        if self.total_bytes <= 0:
            return 0.0
        return 1.0 - self.free_bytes / self.total_bytes

    @classmethod
    def failed(cls, device: str, timestamp: float, error: str) -> "DeviceReading":
        return cls(device=device, timestamp=timestamp, ok=False, error=error)


def counting_free_kv(readings: list[DeviceReading], free_kv: dict[str, int]
                     ) -> list[DeviceReading]:
    """Readings with the service's KV pool that holds no token (by device UUID) counted
    as free: the service sizes a GPU's pool once at start-up, so the card looks that
    much fuller than the service's work makes it, and the pool's free blocks are room the
    service hands out without allocating."""
    adjusted = []
    for reading in readings:
        extra = free_kv.get(reading.device, 0) if reading.ok else 0
        extra = min(extra, reading.used_bytes)
        adjusted.append(replace(reading, free_bytes=reading.free_bytes + extra,
                                used_bytes=reading.used_bytes - extra) if extra else reading)
    return adjusted


class Probe(Protocol):
    """Where readings come from (NVML, the host process, a recorded trace)."""

    def read(self) -> list[DeviceReading]:
        """One reading per watched device; a device that cannot be read gets ok=False."""
        ...

    def close(self) -> None:
        """Release what the probe holds."""
        ...
