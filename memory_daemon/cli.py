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

from autoglm_settings import add_arguments, from_flags, merge
from memory_daemon.actuator import ControlClient
from memory_daemon.config import ENV_PREFIX, DaemonConfig, load_config
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
        "Every config key SECTION.KEY is also the flag --section-key and the environment "
        f"variable {ENV_PREFIX}SECTION_KEY.",
    )
    parser.add_argument("--config", help=f"TOML config file (default: ${ENV_PREFIX}CONFIG)")
    parser.add_argument("--poll-interval", type=float,
                        help="fixed poll interval (sets min and max)")
    add_arguments(parser, DaemonConfig, ENV_PREFIX)
    status = parser.add_mutually_exclusive_group()
    for flag, source, meaning in (
        ("--watch", "watch", "take the service's status from its WatchMemory pushes (default)"),
        ("--poll-status", "poll", "read the service's status with GetMemoryStatus every tick"),
    ):
        status.add_argument(flag, dest="control.status_source", action="store_const",
                            const=source, default=argparse.SUPPRESS, help=meaning)
    return parser


def overrides_from_flags(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given, as a nested config mapping."""
    given = from_flags(DaemonConfig, args)
    if args.poll_interval is None:
        return given
    fixed = {"poll_interval_min_seconds": args.poll_interval,
             "poll_interval_max_seconds": args.poll_interval}
    return merge(given, {"daemon": fixed})


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
