"""Domain errors of the memory daemon and the process exit codes they map to."""

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented exit codes of `autoglm-memd`."""

    OK = 0
    UNEXPECTED = 1
    BAD_CONFIG = 2
    PROBE_UNAVAILABLE = 3


class MemdError(Exception):
    """Base of the daemon's domain errors."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ConfigError(MemdError):
    """The configuration (file, environment or flags) is invalid."""

    exit_code = ExitCode.BAD_CONFIG


class ProbeUnavailableError(MemdError):
    """A probe cannot start (NVML missing, no driver, unreadable trace)."""

    exit_code = ExitCode.PROBE_UNAVAILABLE


class ControlCallError(MemdError):
    """A control RPC failed after its retries."""

    def __init__(self, rpc: str, code: str, details: str) -> None:
        super().__init__(f"{rpc} failed: {code}: {details}")
        self.rpc = rpc
        self.code = code
        self.details = details
