"""Prometheus metrics of the daemon, on their own registry."""

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from memory_daemon.policy import ActionKind, PolicyState
from memory_daemon.readings import DeviceReading

ACTION_RESULTS = ("ok", "failed", "dry_run")


class DaemonMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        labels = ["device"]
        self.used_bytes = Gauge(
            "memd_device_used_bytes", "Device bytes not free", labels, registry=self.registry
        )
        self.total_bytes = Gauge(
            "memd_device_total_bytes", "Device total bytes", labels, registry=self.registry
        )
        self.level = Gauge(
            "memd_device_level",
            "Pressure level: 0 normal, 1 soft, 2 hard",
            labels,
            registry=self.registry,
        )
        self.reading_failures = Counter(
            "memd_reading_failures", "Readings that failed", labels, registry=self.registry
        )
        self.actions = Counter(
            "memd_actions",
            "Actions decided, by kind and result",
            ["action", "result"],
            registry=self.registry,
        )
        self.status_reads = Counter(
            "memd_status_reads",
            "Service statuses a tick used, by origin (watch: a pushed one, poll: GetMemoryStatus)",
            ["origin"],
            registry=self.registry,
        )
        self.freed_bytes = Counter(
            "memd_freed_bytes",
            "Bytes the service reported freed by the daemon's actions, by action",
            ["action"],
            registry=self.registry,
        )
        self.errors = Counter(
            "memd_errors", "Errors by source (probe, control)", ["source"], registry=self.registry
        )
        # every action's series exists from the start, so rate() and dashboards see zeros
        for kind in ActionKind:
            self.freed_bytes.labels(kind.value)
            for result in ACTION_RESULTS:
                self.actions.labels(kind.value, result)
        for source in ("probe", "control"):
            self.errors.labels(source)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe(self, readings: list[DeviceReading], state: PolicyState) -> None:
        for reading in readings:
            failures = self.reading_failures.labels(reading.device)  # at 0 until one fails
            if not reading.ok:
                failures.inc()
                continue
            self.used_bytes.labels(reading.device).set(reading.total_bytes - reading.free_bytes)
            self.total_bytes.labels(reading.device).set(reading.total_bytes)
        for device, device_state in state.devices.items():
            self.level.labels(device).set(int(device_state.level))
