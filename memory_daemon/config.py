"""Configuration: defaults < TOML file < AUTOGLM_MEMD_* environment < CLI flags.

Everything is validated here, once, into one frozen `DaemonConfig`; the rest of the
daemon trusts it. Every problem raises `ConfigError` with the offending key in it. The
dataclasses are the one source of the file keys, the environment variables
(AUTOGLM_MEMD_<SECTION>_<KEY>), the flags (--<section>-<key>, and the short ones named as
aliases) and the README's table (see autoglm_settings).
"""

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoglm_settings import SettingError, build, check_choices, from_environment, merge, setting
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


def _phrased(template: str) -> Callable[[float, str], Any]:
    """A declarer of settings whose help differs in one phrase."""
    return lambda default, phrase: setting(default, help=template.format(phrase))


_cooldown = _phrased("least seconds between two {} on one device")
_mark = _phrased("share of a device's memory in use {}")


@dataclass(frozen=True, slots=True)
class CooldownConfig:
    """Least seconds between two actions of the same kind on the same device."""

    collect_garbage: float = _cooldown(10.0, "garbage collections")
    trim_kv: float = _cooldown(15.0, "KV trims")
    offload_encoders: float = _cooldown(60.0, "encoder offloads")
    limit_admission: float = _cooldown(15.0, "admission limits")
    pause_admission: float = _cooldown(15.0, "admission pauses")
    # re-sent when the service disagrees (for example after it restarted)
    set_admission: float = _cooldown(5.0, "admission mode sends")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _non_negative(f"policy.cooldown_seconds.{f.name}", getattr(self, f.name))


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Marks are fractions of a device's total memory that is not free; each level has an
    enter mark and a lower exit mark (hysteresis)."""

    soft_enter: float = _mark(0.80, "at which soft pressure begins")
    soft_exit: float = _mark(0.70, "below which soft pressure ends")
    hard_enter: float = _mark(0.92, "at which hard pressure begins (it acts at once)")
    hard_exit: float = _mark(0.85, "below which hard pressure ends")
    min_samples_above_soft: int = setting(3, help="fresh readings above soft_enter before "
                                                  "soft pressure acts")
    min_seconds_above_soft: float = setting(2.0, help="seconds above soft_enter before soft "
                                                      "pressure acts")
    transition_seconds: float = setting(30.0, help=(
        "seconds below the exit mark before stepping a level down, and between undo steps"))
    stale_after_seconds: float = setting(10.0, help=(
        "readings (and pushed service statuses) older than this are not used"))
    trend_window_seconds: float = setting(10.0, help="window of the least-squares usage trend")
    trend_min_samples: int = setting(3, help="readings the trend needs")
    trend_horizon_seconds: float = setting(15.0, help=(
        "act early when the trend reaches the hard mark within this many seconds"))
    min_reclaim_bytes: int = setting(0, help="least bytes asked of TrimKvCache")
    admission_limit: int = setting(2, help="max_running of SetAdmission(LIMITED)")
    prefetch_free_fraction: float = setting(0.5, help=(
        "prefetch offloaded encoders once this share of the device is free (0: never)"))
    gc_every_requests: int = setting(0, help="periodic gc every N completed requests (0: off)")
    gc_every_seconds: float = setting(300.0, help="periodic gc every T seconds (0: off)")
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

    probe: str = setting("nvml", aliases=("--probe",), choices=PROBES, help=(
        "where readings come from: every GPU by UUID, the service process against a "
        "budget, or a recorded trace"))
    poll_interval_min_seconds: float = setting(0.5, aliases=("--poll-min",), help=(
        "shortest adaptive poll interval (used while under pressure)"))
    poll_interval_max_seconds: float = setting(5.0, aliases=("--poll-max",), help=(
        "longest adaptive poll interval"))
    poll_safety_factor: float = setting(0.25, help=(
        "poll interval = headroom to the hard mark / peak fill rate * this, clamped"))
    dry_run: bool = setting(False, aliases=("--dry-run",), help="log decisions, do not act")
    once: bool = setting(False, aliases=("--once",), help="one tick, then exit")
    log_level: str = setting("info", aliases=("--log-level",), choices=LOG_LEVELS,
                             help="least level logged")
    log_format: str = setting("json", aliases=("--log-format",), choices=LOG_FORMATS,
                              help="JSON lines on stdout, or a console renderer")
    metrics_port: int = setting(0, aliases=("--metrics-port",), shown="0 (off)",
                                help="serve Prometheus metrics on this port")
    metrics_host: str = setting("127.0.0.1", aliases=("--metrics-host",),
                                help="address the metrics listen on")
    record_path: str = setting("", aliases=("--record",), help=(
        "append every reading to this JSON-lines trace (replayable)"))

    def __post_init__(self) -> None:
        check_choices(self, "daemon", ConfigError)
        _positive("daemon.poll_interval_min_seconds", self.poll_interval_min_seconds)
        _positive("daemon.poll_interval_max_seconds", self.poll_interval_max_seconds)
        if self.poll_interval_max_seconds < self.poll_interval_min_seconds:
            raise ConfigError(
                "daemon.poll_interval_max_seconds must be >= daemon.poll_interval_min_seconds"
            )
        _fraction("daemon.poll_safety_factor", self.poll_safety_factor)
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"daemon.metrics_port must be in [0, 65535], got {self.metrics_port}")
        if not self.metrics_host:
            raise ConfigError("daemon.metrics_host must not be empty")


@dataclass(frozen=True, slots=True)
class ControlSection:
    """How to reach the service's ControlService."""

    target: str = setting(DEFAULT_CONTROL_TARGET, aliases=("--control",), help=(
        "the service's ControlService: a Unix socket, or HOST:PORT with a token"))
    token: str = setting("", aliases=("--token",), help="bearer token for a TCP target")
    # TLS to a TCP target: the CA of the service's certificate; a client certificate and
    # key for mTLS. Either one turns TLS on.
    tls_ca: str = setting("", aliases=("--tls-ca",), help=(
        "PEM CA of the control listener's certificate (turns TLS on)"))
    tls_cert: str = setting("", aliases=("--tls-cert",), help=(
        "client certificate for a control listener that wants mTLS"))
    tls_key: str = setting("", aliases=("--tls-key",), help="key of --tls-cert")
    deadline_seconds: float = setting(5.0, help="deadline of each control RPC")
    retries: int = setting(3, help="retries of a control RPC (UNAVAILABLE, "
                                   "DEADLINE_EXCEEDED, ABORTED)")
    backoff_initial_seconds: float = setting(0.2, help="first retry backoff")
    backoff_max_seconds: float = setting(2.0, help="longest retry backoff")
    offload_tier: str = setting("auto", choices=OFFLOAD_TIERS, help=(
        "where offloaded encoders go (auto: one tier down)"))
    status_source: str = setting("watch", choices=STATUS_SOURCES, help=(
        "the service's status from WatchMemory pushes, or GetMemoryStatus every tick "
        "(--watch, --poll-status)"))
    watch_interval_seconds: float = setting(5.0, help=(
        "longest gap between pushes asked of the service (below "
        "policy.stale_after_seconds)"))

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
        check_choices(self, "control", ConfigError)
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

    devices: tuple[str, ...] = setting((), aliases=("--gpu",), shown="every GPU", help=(
        "GPU UUIDs to watch (repeatable, or comma-separated)"))


@dataclass(frozen=True, slots=True)
class HostSection:
    """The service process's memory against a budget."""

    pid: int = setting(0, aliases=("--pid",), help=(
        "service pid, followed while it lives; then the pid in pid_file, else the one the "
        "service reports"))
    pid_file: str = setting("", aliases=("--pid-file",), help=(
        'file holding the service pid (a number, or JSON with "pid")'))
    budget_bytes: int = setting(0, shown="0 (physical memory)", help=(
        "host memory budget of the service (the tighter of it and a cgroup limit)"))
    cgroup_root: str = setting("/sys/fs/cgroup", help="where cgroup memory files are read")

    def __post_init__(self) -> None:
        _non_negative("host.pid", self.pid)
        _non_negative("host.budget_bytes", self.budget_bytes)


@dataclass(frozen=True, slots=True)
class ReplaySection:
    """A recorded or scripted trace played back as readings."""

    trace: str = setting("", aliases=("--trace",), help="JSON-lines trace for probe replay")
    speed: float = setting(1.0, help="trace seconds per clock second (0: as fast as possible)")

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


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_config(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> DaemonConfig:
    """Build the validated configuration from its three sources (later wins)."""
    environ = os.environ if environ is None else environ
    if path is None and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
    try:
        raw = merge(read_toml(path) if path else {},
                    from_environment(DaemonConfig, environ, ENV_PREFIX, strict=True,
                                     ignore=(ENV_PREFIX + "CONFIG",)),
                    overrides or {})
        return build(DaemonConfig, raw)
    except SettingError as exc:
        raise ConfigError(str(exc)) from exc
    except TypeError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
