"""Host memory of the service process against a budget (for CPU-only hosts).

Two views, the tighter one wins: the process's RSS against the configured budget, and,
where cgroup memory files exist, the cgroup's usage against its limit.
"""

import time
from collections.abc import Callable
from pathlib import Path

import psutil

from memory_daemon.readings import DeviceReading

HOST_DEVICE = "host"
# cgroup v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 60


class HostProbe:
    """Reads one device, "host"; the pid may be set later (learned from the control API)."""

    def __init__(
        self,
        pid: int = 0,
        budget_bytes: int = 0,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.pid = pid
        self._budget = budget_bytes or psutil.virtual_memory().total
        self._cgroup_root = Path(cgroup_root)
        self._clock = clock or time.monotonic

    def read(self) -> list[DeviceReading]:
        now = self._clock()
        if not self.pid:
            return [DeviceReading.failed(HOST_DEVICE, now, "service pid not known yet")]
        try:
            rss = psutil.Process(self.pid).memory_info().rss
        except psutil.Error as exc:
            return [DeviceReading.failed(HOST_DEVICE, now, f"cannot read pid {self.pid}: {exc}")]
        views = [(rss, self._budget)]
        cgroup = self._cgroup_usage()
        if cgroup is not None:
            views.append(cgroup)
        used, total = min(views, key=lambda view: view[1] - view[0])
        return [
            DeviceReading(
                device=HOST_DEVICE,
                timestamp=now,
                total_bytes=total,
                used_bytes=used,
                free_bytes=max(0, total - used),
            )
        ]

    def _cgroup_usage(self) -> tuple[int, int] | None:
        """(usage, limit) from cgroup v2 or v1 files where they exist and set a limit."""
        candidates = (
            (self._cgroup_root / "memory.current", self._cgroup_root / "memory.max"),
            (
                self._cgroup_root / "memory" / "memory.usage_in_bytes",
                self._cgroup_root / "memory" / "memory.limit_in_bytes",
            ),
        )
        for usage_path, limit_path in candidates:
            try:
                usage_text = usage_path.read_text().strip()
                limit_text = limit_path.read_text().strip()
            except OSError:
                continue
            if limit_text == "max" or not limit_text.isdigit() or not usage_text.isdigit():
                continue
            limit = int(limit_text)
            if limit >= _UNLIMITED:
                continue
            return int(usage_text), limit
        return None

    def close(self) -> None:
        """Nothing to release."""
