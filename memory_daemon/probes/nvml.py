"""GPU memory from NVML (nvidia-ml-py), keyed by GPU UUID.

Reads never create a CUDA context: NVML is the driver's management library, and the
daemon never imports torch.
"""

import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import structlog

from memory_daemon.errors import ProbeUnavailableError
from memory_daemon.readings import DeviceReading

log = structlog.get_logger(__name__)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class NvmlProbe:
    """One reading per GPU per call; a GPU that fails to read gets a failed reading."""

    def __init__(
        self,
        nvml: ModuleType | Any | None = None,
        clock: Callable[[], float] | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        if nvml is None:
            import pynvml as nvml
        self._nvml = nvml
        self._clock = clock or time.monotonic
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise ProbeUnavailableError(f"NVML is unavailable: {exc}") from exc
        self._memory_v2 = True
        try:
            self._handles = self._discover(devices)
        except (nvml.NVMLError, ProbeUnavailableError):
            self.close()
            raise
        log.info("memd.nvml_ready", gpus=sorted(self._handles))

    def _discover(self, wanted: Sequence[str]) -> dict[str, Any]:
        nvml = self._nvml
        handles: dict[str, Any] = {}
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                handles[_text(nvml.nvmlDeviceGetUUID(handle))] = handle
        except nvml.NVMLError as exc:
            raise ProbeUnavailableError(f"NVML cannot list GPUs: {exc}") from exc
        missing = sorted(set(wanted) - set(handles))
        if missing:
            raise ProbeUnavailableError(f"GPUs not found by NVML: {', '.join(missing)}")
        if not handles:
            raise ProbeUnavailableError("NVML reports no GPUs")
        if wanted:
            handles = {uuid: handles[uuid] for uuid in wanted}
        return handles

    def read(self) -> list[DeviceReading]:
        return [self._read_one(uuid, handle) for uuid, handle in self._handles.items()]

    def _read_one(self, uuid: str, handle: Any) -> DeviceReading:
        now = self._clock()
        try:
            memory = self._memory_info(handle)
        except self._nvml.NVMLError as exc:
            return DeviceReading.failed(uuid, now, f"{type(exc).__name__}: {exc}")
        return DeviceReading(
            device=uuid,
            timestamp=now,
            total_bytes=int(memory.total),
            used_bytes=int(memory.used),
            free_bytes=int(memory.free),
        )

    def _memory_info(self, handle: Any) -> Any:
        """v2 counts driver-reserved memory as used; drivers without it get v1."""
        nvml = self._nvml
        if self._memory_v2:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except (
                nvml.NVMLError_FunctionNotFound,
                nvml.NVMLError_NotSupported,
                nvml.NVMLError_ArgumentVersionMismatch,
            ):
                self._memory_v2 = False
                log.info("memd.nvml_memory_v1_fallback")
        return nvml.nvmlDeviceGetMemoryInfo(handle)

    def process_usage(self) -> dict[str, dict[int, int]]:
        """Advisory per-process GPU bytes by GPU UUID; GPUs that fail are left out."""
        usage: dict[str, dict[int, int]] = {}
        for uuid, handle in self._handles.items():
            try:
                processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(handle)
            except self._nvml.NVMLError:
                continue
            usage[uuid] = {int(p.pid): int(p.usedGpuMemory or 0) for p in processes}
        return usage

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            log.warning("memd.nvml_shutdown_failed")
