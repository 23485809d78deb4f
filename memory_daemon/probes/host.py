"""Host memory of the service process against a budget (for CPU-only hosts).

Two views, the tighter one wins: the process's RSS against the configured budget, and,
where cgroup memory files exist, the cgroup's usage against its limit.

Which process: the one `--pid` names while it lives; after that (or without it) the pid
in `--pid-file`, else the pid the service reports over the control API. They are looked
at again on every read, so a restarted service is followed to its new pid; losing the
process and finding one are logged once each.
"""

import json
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import structlog

from memory_daemon.readings import DeviceReading

log = structlog.get_logger(__name__)

HOST_DEVICE = "host"
# cgroup v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 60


def read_pid_file(path: Path) -> int:
    """The pid in `path`: a bare number, or the "pid" of a JSON object (the service's
    `--port-file`); 0 when the file is missing or holds neither."""
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    if text.isdigit():
        return int(text)
    try:
        data = json.loads(text)
    except ValueError:
        return 0
    pid = data.get("pid") if isinstance(data, dict) else None
    return pid if type(pid) is int and pid > 0 else 0


def _alive(process: psutil.Process) -> bool:
    """Running and not a zombie (a dead child its parent has not reaped yet)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _live(pid: int, current: psutil.Process | None) -> psutil.Process | None:
    """A live process for `pid`: the one already followed when it is that pid."""
    if not pid:
        return None
    if current is not None and current.pid == pid:
        return current
    try:
        process = psutil.Process(pid)
    except psutil.Error:
        return None
    return process if _alive(process) else None


class HostProbe:
    """Reads one device, "host": the memory of the service process it follows."""

    def __init__(
        self,
        pid: int = 0,
        budget_bytes: int = 0,
        cgroup_root: str | Path = "/sys/fs/cgroup",
        clock: Callable[[], float] | None = None,
        pid_file: str | Path = "",
    ) -> None:
        self._pinned = pid  # --pid: followed while that process lives, never again after
        self._pid_file = Path(pid_file) if pid_file else None
        self._reported = 0
        self._process: psutil.Process | None = None
        self._source = ""
        self._lost = 0  # the pid last lost, until a process is found again
        self._budget = budget_bytes or psutil.virtual_memory().total
        self._cgroup_root = Path(cgroup_root)
        self._clock = clock or time.monotonic

    @property
    def pid(self) -> int:
        """The pid being read; 0 while none is known or alive."""
        return self._process.pid if self._process is not None else 0

    def report_service_pid(self, pid: int) -> None:
        """The pid the service itself reports (MemoryStatus.pid)."""
        self._reported = pid

    def read(self) -> list[DeviceReading]:
        now = self._clock()
        process = self._follow()
        if process is None:
            error = (
                f"service process {self._lost} is gone; its successor is not known yet"
                if self._lost
                else "service pid not known yet"
            )
            return [DeviceReading.failed(HOST_DEVICE, now, error)]
        try:
            rss = process.memory_info().rss
        except psutil.Error as exc:
            return [DeviceReading.failed(HOST_DEVICE, now, f"cannot read pid {process.pid}: {exc}")]
        if not rss and not _alive(process):  # it exited just now: 0 is no reading
            return [DeviceReading.failed(HOST_DEVICE, now, f"pid {process.pid} exited")]
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

    def _follow(self) -> psutil.Process | None:
        """The process to read: the first source's live one, else the one followed so far."""
        current = self._process
        if current is not None and not _alive(current):
            self._lose(current.pid, self._source)
            if self._source == "pid":
                self._pinned = 0  # never again: its pid may be reused by an unrelated process
            current = self._process = None
        chosen = self._choose(current)
        if chosen is not None and (current is None or chosen[0].pid != current.pid):
            process, source = chosen
            log.info(
                "memd.service_pid_found",
                pid=process.pid,
                source=source,
                previous=current.pid if current is not None else self._lost or None,
            )
            self._process, self._source, self._lost = process, source, 0
        return self._process

    def _choose(self, current: psutil.Process | None) -> tuple[psutil.Process, str] | None:
        if self._pinned:
            pinned = _live(self._pinned, current)
            if pinned is not None:
                return pinned, "pid"
            self._lose(self._pinned, "pid")  # not running when first looked at
            self._pinned = 0
        if self._pid_file is not None:
            process = _live(read_pid_file(self._pid_file), current)
            if process is not None:
                return process, "pid_file"
        process = _live(self._reported, current)
        return (process, "service") if process is not None else None

    def _lose(self, pid: int, source: str) -> None:
        log.warning("memd.service_pid_lost", pid=pid, source=source)
        self._lost = pid

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
