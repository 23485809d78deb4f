"""Prometheus metrics: request counters and latencies, and the engine's memory gauges.

Counters and histograms are updated by the transport; gauges are read from the engine
at scrape time, so they are never stale.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from inference_svc.memory.process import rss_bytes
from inference_svc.service_state import ServiceState

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    def __init__(self, state: ServiceState) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter("autoglm_rpcs", "RPCs finished, by method and status code",
                            ["method", "code"], registry=self.registry)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens processed",
                                     registry=self.registry)
        self.cached_prompt_tokens = Counter(
            "autoglm_cached_prompt_tokens", "Prompt tokens served from cached KV",
            registry=self.registry)
        self.completion_tokens = Counter("autoglm_completion_tokens", "Tokens generated",
                                         registry=self.registry)
        self.time_to_first_token = Histogram(
            "autoglm_time_to_first_token_seconds", "Generate: call start to first text",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generation_seconds = Histogram(
            "autoglm_generation_seconds", "Generate: call start to final message",
            buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(state))

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)


class _EngineCollector:
    def __init__(self, state: ServiceState) -> None:
        self.state = state

    def collect(self):
        rss = GaugeMetricFamily("autoglm_process_resident_bytes", "Service process RSS")
        rss.add_metric([], rss_bytes())
        yield rss
        engine = self.state.engine
        if engine is None:
            return
        gauges = {
            "autoglm_running_requests": ("Requests being generated", len(engine.running())),
            "autoglm_queued_requests": ("Requests waiting for admission", engine.queued),
            "autoglm_idle_kv_bytes": ("KV held by idle sessions and cached prefixes",
                                      engine.sessions.total_bytes()),
            "autoglm_kv_budget_bytes": ("Configured KV budget", engine.config.kv_budget_bytes),
        }
        for name, (help_text, value) in gauges.items():
            gauge = GaugeMetricFamily(name, help_text)
            gauge.add_metric([], value)
            yield gauge
        weights = GaugeMetricFamily("autoglm_module_weight_bytes",
                                    "Resident weight bytes of each module, by tier",
                                    labels=["module", "tier"])
        for unit in engine.model.units:
            state = unit.state()
            weights.add_metric([state.name, state.tier], state.weight_bytes)
        yield weights
        admission = GaugeMetricFamily("autoglm_admission_open",
                                      "1 while admission is open, 0 when limited or paused")
        admission.add_metric([], 1 if engine.admission.mode == "open" else 0)
        yield admission
