"""Configuration: defaults < TOML file < AUTOGLM_MEMD_* environment < CLI flags.

Everything is validated here, once, into one frozen `DaemonConfig`; the rest of the
daemon trusts it. Every problem raises `ConfigError` with the offending key in it.
"""

import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from memory_daemon.errors import ConfigError

ENV_PREFIX = "AUTOGLM_MEMD_"
DEFAULT_CONTROL_TARGET = "unix:///tmp/autoglm-control.sock"
PROBES = ("nvml", "host", "replay")
OFFLOAD_TIERS = ("auto", "cpu", "disk")
STATUS_SOURCES = ("watch", "poll")
LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _fraction(key: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"{key} must be a fraction in (0, 1], got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class CooldownConfig:
    """Least seconds between two actions of the same kind on the same device."""

    collect_garbage: float = 10.0
    trim_kv: float = 15.0
    offload_encoders: float = 60.0
    limit_admission: float = 15.0
    pause_admission: float = 15.0
    set_admission: float = 5.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _non_negative(f"policy.cooldown_seconds.{f.name}", getattr(self, f.name))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Marks are fractions of a device's total memory that is not free."""

    soft_enter: float = 0.80
    soft_exit: float = 0.70
    hard_enter: float = 0.92
    hard_exit: float = 0.85
    min_samples_above_soft: int = 3
    min_seconds_above_soft: float = 2.0
    transition_seconds: float = 30.0
    stale_after_seconds: float = 10.0
    trend_window_seconds: float = 10.0
    trend_min_samples: int = 3
    trend_horizon_seconds: float = 15.0
    min_reclaim_bytes: int = 0
    admission_limit: int = 2
    prefetch_free_fraction: float = 0.5
    gc_every_requests: int = 0
    gc_every_seconds: float = 300.0
    cooldown_seconds: CooldownConfig = field(default_factory=CooldownConfig)

    def __post_init__(self) -> None:
        for key in ("soft_enter", "soft_exit", "hard_enter", "hard_exit"):
            _fraction(f"policy.{key}", getattr(self, key))
        if self.soft_exit >= self.soft_enter:
            raise ConfigError(
                f"policy.soft_exit ({self.soft_exit}) must be below policy.soft_enter "
                f"({self.soft_enter})"
            )
        if self.hard_exit >= self.hard_enter:
            raise ConfigError(
                f"policy.hard_exit ({self.hard_exit}) must be below policy.hard_enter "
                f"({self.hard_enter})"
            )
        if self.hard_enter <= self.soft_enter:
            raise ConfigError(
                f"policy.hard_enter ({self.hard_enter}) must be above policy.soft_enter "
                f"({self.soft_enter})"
            )
        if self.hard_exit < self.soft_exit:
            raise ConfigError(
                f"policy.hard_exit ({self.hard_exit}) must not be below policy.soft_exit "
                f"({self.soft_exit})"
            )
        for key in (
            "min_samples_above_soft",
            "min_seconds_above_soft",
            "min_reclaim_bytes",
            "transition_seconds",
            "gc_every_requests",
            "gc_every_seconds",
            "prefetch_free_fraction",
        ):
            _non_negative(f"policy.{key}", getattr(self, key))
        for key in ("stale_after_seconds", "trend_window_seconds", "trend_horizon_seconds"):
            _positive(f"policy.{key}", getattr(self, key))
        if self.trend_min_samples < 2:
            raise ConfigError(
                f"policy.trend_min_samples must be >= 2, got {self.trend_min_samples}"
            )
        if self.admission_limit < 1:
            raise ConfigError(f"policy.admission_limit must be >= 1, got {self.admission_limit}")
        if self.prefetch_free_fraction > 1.0:
            raise ConfigError(
                "policy.prefetch_free_fraction must be in [0, 1], "
                f"got {self.prefetch_free_fraction}"
            )


@dataclass(frozen=True, slots=True)
class DaemonSection:
    """How the loop runs."""

    probe: str = "nvml"
    poll_interval_min_seconds: float = 0.5
    poll_interval_max_seconds: float = 5.0
    poll_safety_factor: float = 0.25
    dry_run: bool = False
    once: bool = False
    log_level: str = "info"
    log_format: str = "json"
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    record_path: str = ""

    def __post_init__(self) -> None:
        if self.probe not in PROBES:
            raise ConfigError(f"daemon.probe must be one of {PROBES}, got {self.probe!r}")
        _positive("daemon.poll_interval_min_seconds", self.poll_interval_min_seconds)
        _positive("daemon.poll_interval_max_seconds", self.poll_interval_max_seconds)
        if self.poll_interval_max_seconds < self.poll_interval_min_seconds:
            raise ConfigError(
                "daemon.poll_interval_max_seconds must be >= daemon.poll_interval_min_seconds"
            )
        _fraction("daemon.poll_safety_factor", self.poll_safety_factor)
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"daemon.log_level must be one of {LOG_LEVELS}, got {self.log_level!r}"
            )
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"daemon.log_format must be one of {LOG_FORMATS}, got {self.log_format!r}"
            )
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"daemon.metrics_port must be in [0, 65535], got {self.metrics_port}")
        if not self.metrics_host:
            raise ConfigError("daemon.metrics_host must not be empty")


@dataclass(frozen=True, slots=True)
class ControlSection:
    """How to reach the service's ControlService."""

    target: str = DEFAULT_CONTROL_TARGET
    token: str = ""
    # TLS to a TCP target: the CA of the service's certificate; a client certificate and
    # key for mTLS. Either one turns TLS on.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    deadline_seconds: float = 5.0
    retries: int = 3
    backoff_initial_seconds: float = 0.2
    backoff_max_seconds: float = 2.0
    offload_tier: str = "auto"
    status_source: str = "watch"
    watch_interval_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.target:
            raise ConfigError("control.target must not be empty")
        _positive("control.deadline_seconds", self.deadline_seconds)
        _non_negative("control.retries", self.retries)
        _positive("control.backoff_initial_seconds", self.backoff_initial_seconds)
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ConfigError(
                "control.backoff_max_seconds must be >= control.backoff_initial_seconds"
            )
        if self.offload_tier not in OFFLOAD_TIERS:
            raise ConfigError(
                f"control.offload_tier must be one of {OFFLOAD_TIERS}, got {self.offload_tier!r}"
            )
        if self.status_source not in STATUS_SOURCES:
            raise ConfigError(
                f"control.status_source must be one of {STATUS_SOURCES}, got {self.status_source!r}"
            )
        _positive("control.watch_interval_seconds", self.watch_interval_seconds)
        if not self.is_unix and not self.token:
            raise ConfigError(
                f"control.token is required for the TCP target {self.target!r} "
                f"(or set {ENV_PREFIX}CONTROL_TOKEN)"
            )
        self._check_tls()

    def _check_tls(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("control.tls_cert and control.tls_key go together")
        if self.tls and self.is_unix:
            raise ConfigError("control.tls_* apply to a TCP target, not a Unix socket")
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                raise ConfigError(f"control.{key} {path!r} is not a readable file")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @property
    def is_unix(self) -> bool:
        return self.target.startswith("unix:")


@dataclass(frozen=True, slots=True)
class NvmlSection:
    """Which GPUs to watch: UUIDs; empty means every GPU of the node."""

    devices: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HostSection:
    """The service process's memory against a budget."""

    pid: int = 0
    pid_file: str = ""
    budget_bytes: int = 0
    cgroup_root: str = "/sys/fs/cgroup"

    def __post_init__(self) -> None:
        _non_negative("host.pid", self.pid)
        _non_negative("host.budget_bytes", self.budget_bytes)


@dataclass(frozen=True, slots=True)
class ReplaySection:
    """A recorded or scripted trace played back as readings."""

    trace: str = ""
    speed: float = 1.0

    def __post_init__(self) -> None:
        _non_negative("replay.speed", self.speed)


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """The whole validated configuration."""

    daemon: DaemonSection = field(default_factory=DaemonSection)
    control: ControlSection = field(default_factory=ControlSection)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    nvml: NvmlSection = field(default_factory=NvmlSection)
    host: HostSection = field(default_factory=HostSection)
    replay: ReplaySection = field(default_factory=ReplaySection)

    def __post_init__(self) -> None:
        if self.daemon.probe == "replay" and not self.replay.trace:
            raise ConfigError("replay.trace (--trace) is required with probe 'replay'")
        if (
            self.control.status_source == "watch"
            and self.control.watch_interval_seconds >= self.policy.stale_after_seconds
        ):
            # Every pushed status would be stale before the next one arrives.
            raise ConfigError(
                f"control.watch_interval_seconds ({self.control.watch_interval_seconds}) must "
                f"be below policy.stale_after_seconds ({self.policy.stale_after_seconds})"
            )


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a TOML value or an environment string to the field's type, strictly."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be a boolean, got {value!r}")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        else:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if kind == tuple[str, ...]:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return tuple(value)
        raise ConfigError(f"{key} must be a list of strings, got {value!r}")
    raise AssertionError(f"unsupported config type {kind} for {key}")


def _build(cls: type, raw: Mapping[str, Any], prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{prefix}] must be a table, got {raw!r}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        where = f"[{prefix}]" if prefix else "the top level"
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, value, key)
        else:
            values[name] = _coerce(key, value, kind)
    return cls(**values)


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _env_paths(cls: type, prefix: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Map AUTOGLM_MEMD_SECTION_KEY names to their key paths."""
    paths: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(cls):
        kind = get_type_hints(cls)[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(kind):
            paths.update(_env_paths(kind, path))
        else:
            paths[ENV_PREFIX + "_".join(path).upper()] = path
    return paths


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The AUTOGLM_MEMD_* variables as a nested mapping; unknown ones are errors."""
    known = _env_paths(DaemonConfig, ())
    nested: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        path = known.get(name)
        if path is None:
            raise ConfigError(f"unknown environment variable {name}")
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return nested


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Build the validated configuration from its three sources (later wins)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    raw: dict[str, Any] = read_toml(path) if path else {}
    raw = _merge(raw, read_env(environ))
    raw = _merge(raw, overrides or {})
    try:
        return _build(DaemonConfig, raw, "")
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
