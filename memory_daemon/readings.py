"""What a probe reports: one reading per device per tick."""

from dataclasses import dataclass
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


class Probe(Protocol):
    """Where readings come from (NVML, the host process, a recorded trace)."""

    def read(self) -> list[DeviceReading]:
        """One reading per watched device; a device that cannot be read gets ok=False."""
        ...

    def close(self) -> None:
        """Release what the probe holds."""
        ...
