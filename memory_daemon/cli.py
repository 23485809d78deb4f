"""`autoglm-memd`: the memory daemon's command line.

Exit codes: 0 stopped cleanly (signal, --once, replay finished); 1 unexpected error;
2 bad configuration (file, environment or flags); 3 probe unavailable (NVML missing or
failing at start, unreadable trace).
"""

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from memory_daemon.actuator import ControlClient
from memory_daemon.config import LOG_FORMATS, LOG_LEVELS, PROBES, DaemonConfig, load_config
from memory_daemon.daemon import Clock, Daemon, MonotonicClock, VirtualClock
from memory_daemon.errors import ExitCode, MemdError
from memory_daemon.logs import configure_logging
from memory_daemon.metrics import DaemonMetrics
from memory_daemon.probes.host import HostProbe
from memory_daemon.probes.nvml import NvmlProbe
from memory_daemon.probes.replay import ReplayProbe, TraceRecorder, load_trace
from memory_daemon.readings import Probe

log = structlog.get_logger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(ExitCode.BAD_CONFIG, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="autoglm-memd",
        description="Watch GPU/host memory and ask autoglm-serve to free memory before OOM.",
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad configuration, 3 probe unavailable. "
        "Every config key can also be set as AUTOGLM_MEMD_<SECTION>_<KEY>.",
    )
    add = parser.add_argument
    add("--config", help="TOML config file (default: $AUTOGLM_MEMD_CONFIG)")
    add("--probe", choices=PROBES, help="where readings come from")
    add("--trace", help="JSON-lines trace for --probe replay")
    add("--replay-speed", type=float, help="trace time per clock second; 0 = as fast as possible")
    add("--record", help="append every reading to this JSON-lines trace")
    add("--control", help="ControlService target, e.g. unix:///tmp/autoglm-control.sock")
    add("--token", help="bearer token for a TCP control target")
    add("--tls-ca", help="PEM CA of the control listener's certificate (turns TLS on)")
    add("--tls-cert", help="client certificate for a control listener that wants mTLS")
    add("--tls-key", help="key of --tls-cert")
    status = parser.add_mutually_exclusive_group()
    status.add_argument(
        "--watch",
        dest="status_source",
        action="store_const",
        const="watch",
        help="take the service's status from its WatchMemory pushes (default)",
    )
    status.add_argument(
        "--poll-status",
        dest="status_source",
        action="store_const",
        const="poll",
        help="read the service's status with GetMemoryStatus every tick",
    )
    add("--poll-interval", type=float, help="fixed poll interval (sets min and max)")
    add("--poll-min", type=float, help="shortest adaptive poll interval, seconds")
    add("--poll-max", type=float, help="longest adaptive poll interval, seconds")
    add("--gpu", action="append", help="GPU UUID to watch (repeatable; default all)")
    add(
        "--pid",
        type=int,
        help="service pid for --probe host, followed while it lives; then (and by default) "
        "the pid in --pid-file, else the one the service reports",
    )
    add("--pid-file", help='file holding the service pid (a number, or JSON with "pid")')
    add("--host-budget-bytes", type=int, help="host memory budget for --probe host")
    add("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    add("--metrics-host", help="address the metrics listen on (default 127.0.0.1)")
    add("--log-level", choices=LOG_LEVELS)
    add("--log-format", choices=LOG_FORMATS)
    add("--dry-run", action="store_true", default=None, help="log decisions, do not act")
    add("--once", action="store_true", default=None, help="one tick, then exit")
    return parser


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given, as a nested config mapping."""
    flags = {
        ("daemon", "probe"): args.probe,
        ("daemon", "record_path"): args.record,
        ("daemon", "poll_interval_min_seconds"): args.poll_min,
        ("daemon", "poll_interval_max_seconds"): args.poll_max,
        ("daemon", "metrics_port"): args.metrics_port,
        ("daemon", "metrics_host"): args.metrics_host,
        ("daemon", "log_level"): args.log_level,
        ("daemon", "log_format"): args.log_format,
        ("daemon", "dry_run"): args.dry_run,
        ("daemon", "once"): args.once,
        ("replay", "trace"): args.trace,
        ("replay", "speed"): args.replay_speed,
        ("control", "target"): args.control,
        ("control", "token"): args.token,
        ("control", "tls_ca"): args.tls_ca,
        ("control", "tls_cert"): args.tls_cert,
        ("control", "tls_key"): args.tls_key,
        ("control", "status_source"): args.status_source,
        ("nvml", "devices"): args.gpu,
        ("host", "pid"): args.pid,
        ("host", "pid_file"): args.pid_file,
        ("host", "budget_bytes"): args.host_budget_bytes,
    }
    if args.poll_interval is not None:
        flags[("daemon", "poll_interval_min_seconds")] = args.poll_interval
        flags[("daemon", "poll_interval_max_seconds")] = args.poll_interval
    nested: dict[str, Any] = {}
    for (section, key), value in flags.items():
        if value is not None:
            nested.setdefault(section, {})[key] = value
    return nested


def build_probe(config: DaemonConfig, clock: Clock) -> Probe:
    match config.daemon.probe:
        case "nvml":
            return NvmlProbe(clock=clock.now, devices=config.nvml.devices)
        case "host":
            return HostProbe(
                pid=config.host.pid,
                pid_file=config.host.pid_file,
                budget_bytes=config.host.budget_bytes,
                cgroup_root=config.host.cgroup_root,
                clock=clock.now,
            )
        case _:
            speed = config.replay.speed or 1.0
            return ReplayProbe(load_trace(config.replay.trace), clock=clock.now, speed=speed)


async def run_daemon(config: DaemonConfig) -> None:
    clock: Clock = (
        VirtualClock()
        if config.daemon.probe == "replay" and config.replay.speed == 0
        else MonotonicClock()
    )
    probe = build_probe(config, clock)
    control = ControlClient(config.control, config.control.offload_tier)
    metrics = DaemonMetrics()
    if config.daemon.metrics_port:
        metrics.serve(config.daemon.metrics_port, config.daemon.metrics_host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.ExitStack() as stack:
        recorder = None
        if config.daemon.record_path:
            sink = stack.enter_context(open(config.daemon.record_path, "a"))
            recorder = TraceRecorder(sink)
        daemon = Daemon(config, probe, clock, control, metrics, recorder)
        log.info(
            "memd.started",
            probe=config.daemon.probe,
            control=config.control.target,
            status_source=config.control.status_source,
            dry_run=config.daemon.dry_run,
        )
        try:
            await daemon.run(stop)
        finally:
            await control.close()
            probe.close()
            log.info("memd.stopped", ticks=daemon.ticks)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, validate, run; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, overrides=overrides_from_flags(args))
        configure_logging(config.daemon.log_level, config.daemon.log_format)
        asyncio.run(run_daemon(config))
    except MemdError as exc:
        sys.stderr.write(f"autoglm-memd: error: {exc}\n")
        log.error("memd.exit", error=str(exc), exit_code=int(exc.exit_code))
        return exc.exit_code
    return ExitCode.OK


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))
