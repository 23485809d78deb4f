"""The NVML probe against a stand-in pynvml module, and the real one failing cleanly here."""

import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pynvml
import pytest

from memory_daemon.errors import ExitCode, ProbeUnavailableError
from memory_daemon.probes.nvml import NvmlProbe

GIB = 1 << 30


@dataclass
class FakeGpu:
    uuid: str
    total: int
    used: int
    reserved: int = 0
    lost: bool = False
    processes: list[SimpleNamespace] = field(default_factory=list)


class FakeNvml:
    """Same function names, constants and error classes as pynvml."""

    NVMLError = pynvml.NVMLError
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_ArgumentVersionMismatch = pynvml.NVMLError_ArgumentVersionMismatch
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu], has_v2: bool = True, init_error=None) -> None:
        self.gpus = gpus
        self.has_v2 = has_v2
        self.init_error = init_error
        self.v1_calls = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> bytes:
        return handle.uuid.encode()

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version=None) -> SimpleNamespace:
        if handle.lost:
            raise pynvml.NVMLError_GpuIsLost()
        if version is None:
            self.v1_calls += 1
            used = handle.used
        elif not self.has_v2:
            raise pynvml.NVMLError_FunctionNotFound()
        else:
            used = handle.used + handle.reserved
        return SimpleNamespace(
            total=handle.total, used=used, free=handle.total - used, reserved=handle.reserved
        )

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        if handle.lost:
            raise pynvml.NVMLError_GpuIsLost()
        return handle.processes


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-0000", total=24 * GIB, used=10 * GIB, reserved=GIB // 2),
        FakeGpu("GPU-1111", total=24 * GIB, used=20 * GIB),
    ]


def test_readings_are_keyed_by_uuid_and_count_reserved_memory_as_used():
    probe = NvmlProbe(FakeNvml(two_gpus()), clock=lambda: 7.0)
    readings = {r.device: r for r in probe.read()}
    assert set(readings) == {"GPU-0000", "GPU-1111"}
    first = readings["GPU-0000"]
    assert first.ok and first.timestamp == 7.0
    assert first.total_bytes == 24 * GIB
    assert first.free_bytes == 24 * GIB - 10 * GIB - GIB // 2
    assert first.used_bytes == 10 * GIB + GIB // 2


def test_falls_back_to_memory_info_v1_where_the_driver_lacks_v2():
    nvml = FakeNvml(two_gpus(), has_v2=False)
    probe = NvmlProbe(nvml)
    first = probe.read()
    second = probe.read()
    assert all(r.ok for r in first + second)
    assert first[0].free_bytes == 14 * GIB  # v1 does not see the reserved half GiB
    assert nvml.v1_calls == 4


def test_a_gpu_that_vanishes_mid_run_gives_a_failed_reading_not_a_crash():
    gpus = two_gpus()
    probe = NvmlProbe(FakeNvml(gpus))
    gpus[1].lost = True
    readings = {r.device: r for r in probe.read()}
    assert readings["GPU-0000"].ok
    assert not readings["GPU-1111"].ok
    assert "GpuIsLost" in readings["GPU-1111"].error
    assert probe.process_usage().keys() == {"GPU-0000"}
    gpus[1].lost = False
    assert all(r.ok for r in probe.read())


def test_watches_only_the_configured_gpus():
    probe = NvmlProbe(FakeNvml(two_gpus()), devices=["GPU-1111"])
    assert [r.device for r in probe.read()] == ["GPU-1111"]


def test_an_unknown_configured_gpu_is_a_startup_error():
    nvml = FakeNvml(two_gpus())
    with pytest.raises(ProbeUnavailableError, match="GPU-9999"):
        NvmlProbe(nvml, devices=["GPU-9999"])
    assert nvml.shutdowns == 1


def test_no_gpus_is_a_startup_error():
    with pytest.raises(ProbeUnavailableError, match="no GPUs"):
        NvmlProbe(FakeNvml([]))


def test_library_missing_is_a_startup_error():
    missing = FakeNvml([], init_error=pynvml.NVMLError_LibraryNotFound())
    with pytest.raises(ProbeUnavailableError, match="NVML is unavailable"):
        NvmlProbe(missing)


def test_per_process_usage_is_reported():
    gpus = two_gpus()
    gpus[0].processes = [SimpleNamespace(pid=42, usedGpuMemory=3 * GIB)]
    usage = NvmlProbe(FakeNvml(gpus)).process_usage()
    assert usage == {"GPU-0000": {42: 3 * GIB}, "GPU-1111": {}}


def _real_nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


REAL_NVML = _real_nvml_works()


@pytest.mark.skipif(REAL_NVML, reason="NVML works on this host")
def test_real_pynvml_fails_cleanly_without_a_driver():
    with pytest.raises(ProbeUnavailableError, match="NVML is unavailable"):
        NvmlProbe()


@pytest.mark.skipif(REAL_NVML, reason="NVML works on this host")
def test_cli_exits_with_the_probe_unavailable_code_without_nvml():
    done = subprocess.run(
        [sys.executable, "-m", "memory_daemon", "--probe", "nvml", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == ExitCode.PROBE_UNAVAILABLE
    assert "NVML is unavailable" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not REAL_NVML, reason="needs an NVIDIA driver")
def test_real_nvml_reads_every_gpu():
    probe = NvmlProbe()
    try:
        readings = probe.read()
    finally:
        probe.close()
    assert readings
    assert all(r.ok and r.device.startswith("GPU-") and r.total_bytes > 0 for r in readings)
