"""Prometheus metrics of the service, named in vLLM's terms with a `model_name` label.

Three sources:

* the interceptor counts every RPC by method and status code (cancelled ones as
  CANCELLED);
* the transport observes each Generate call's lifecycle as the client sees it: time to
  first token, the gaps between streamed deltas, end-to-end latency by finish reason,
  prompt and generation lengths (`RequestTimer`; a GenerateLive call's from its `end`),
  and GenerateLive's audio input: streams open, seconds of audio received;
* gauges are read from the engine at scrape time (`_EngineCollector`), so they are
  never stale: running and waiting requests, KV held by running requests and by idle
  caches against the budget, cached entries, module placement, admission.

Queue time and preemptions happen inside the engine, which reports them through
`EngineObserver` (`ServiceMetrics` implements it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from inference_svc.process_memory import rss_bytes
from inference_svc.service_state import ServiceState
from inference_svc.types import Finished, FinishReason

# request latencies: 10 ms .. 10 min (a 3,000-token phone-agent answer on CPU is minutes)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# encoding one live audio chunk (640 ms of speech by default): 2.5 ms .. 2.56 s
CHUNK_ENCODE_BUCKETS = (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)
# the gap between two streamed tokens: 1 ms .. 10 s
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                     0.3, 0.5, 0.75, 1, 2.5, 5, 10)
# tokens per request, 1-2-5 steps up to a 32k context (vLLM's build_1_2_5_buckets)
LENGTH_BUCKETS = tuple(m * 10**e for e in range(5) for m in (1, 2, 5) if m * 10**e <= 32768)
# finish reasons of the e2e histogram: the engine's, and the ways a call ends without one
ERROR_REASONS = ("deadline", "error")


class EngineObserver(Protocol):
    """What the engine reports as it schedules."""

    def request_admitted(self, queued_seconds: float) -> None:
        """A request left the waiting queue for the running batch after this long."""

    def request_preempted(self, reason: str) -> None:
        """A running request was preempted (its KV freed, itself re-queued)."""


class ServiceMetrics:
    def __init__(self, state: ServiceState) -> None:
        self.model_name = state.config.served_model_name
        self.registry = CollectorRegistry()
        registry, model = self.registry, ["model_name"]
        self.rpcs = Counter("autoglm_rpcs", "RPCs finished, by method and status code",
                            ["method", "code"], registry=registry)
        self.prompt_tokens = Counter("autoglm_prompt_tokens", "Prompt tokens processed",
                                     model, registry=registry).labels(self.model_name)
        self.cached_prompt_tokens = Counter(
            "autoglm_cached_prompt_tokens",
            "Prompt tokens served from cached KV (session or prefix cache hits)",
            model, registry=registry).labels(self.model_name)
        self.completion_tokens = Counter("autoglm_completion_tokens", "Tokens generated",
                                         model, registry=registry).labels(self.model_name)
        self.preemptions = Counter(
            "autoglm_num_preemptions", "Running requests preempted (re-queued, KV freed)",
            model, registry=registry).labels(self.model_name)
        self.queue_time = Histogram(
            "autoglm_request_queue_time_seconds", "Time a request waited for admission",
            model, buckets=LATENCY_BUCKETS, registry=registry).labels(self.model_name)
        self.time_to_first_token = Histogram(
            "autoglm_time_to_first_token_seconds",
            "Generate: call start to the first streamed text",
            model, buckets=LATENCY_BUCKETS, registry=registry).labels(self.model_name)
        self.inter_token_latency = Histogram(
            "autoglm_inter_token_latency_seconds",
            "Generate: gap between consecutive streamed deltas, per token",
            model, buckets=TOKEN_GAP_BUCKETS, registry=registry).labels(self.model_name)
        self.e2e_latency = Histogram(
            "autoglm_e2e_request_latency_seconds",
            "Generate: call start to its end, by finish reason",
            ["model_name", "finished_reason"], buckets=LATENCY_BUCKETS, registry=registry)
        self.prompt_length = Histogram(
            "autoglm_request_prompt_tokens", "Prompt length of finished requests",
            model, buckets=LENGTH_BUCKETS, registry=registry).labels(self.model_name)
        self.generation_length = Histogram(
            "autoglm_request_generation_tokens", "Tokens generated by finished requests",
            model, buckets=LENGTH_BUCKETS, registry=registry).labels(self.model_name)
        self.live_audio_streams = Gauge(
            "autoglm_live_audio_streams_open", "GenerateLive streams open (taking audio or "
            "replying)", model, registry=registry).labels(self.model_name)
        self.live_audio_seconds = Counter(
            "autoglm_live_audio_received_seconds", "Seconds of audio GenerateLive streams "
            "received", model, registry=registry).labels(self.model_name)
        self.live_audio_chunk_encode = Histogram(
            "autoglm_live_audio_chunk_encode_seconds", "Time to encode one chunk of live "
            "audio (640 ms of speech by default)", model, buckets=CHUNK_ENCODE_BUCKETS,
            registry=registry).labels(self.model_name)
        self.live_audio_first_token = Histogram(
            "autoglm_live_audio_end_to_first_token_seconds", "GenerateLive: time from the "
            "end of the audio to the first token", model, buckets=LATENCY_BUCKETS,
            registry=registry).labels(self.model_name)
        # every reason's series exists from the start, so rate() and dashboards see zeros
        for reason in (*(r.value for r in FinishReason), *ERROR_REASONS):
            self.e2e_latency.labels(self.model_name, reason)
        registry.register(_EngineCollector(state, self.model_name))

    def serve(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    # ---- EngineObserver -------------------------------------------------------------

    def request_admitted(self, queued_seconds: float) -> None:
        self.queue_time.observe(queued_seconds)

    def request_preempted(self, reason: str) -> None:
        self.preemptions.inc()

    # ---- the transport's view of one Generate call --------------------------------

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One Generate call as the client sees it: first token, gaps, end."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.last_delta: float | None = None

    def delta(self) -> None:
        now = time.monotonic()
        if self.last_delta is None:
            self.metrics.time_to_first_token.observe(now - self.started)
        else:
            self.metrics.inter_token_latency.observe(now - self.last_delta)
        self.last_delta = now

    def finished(self, event: Finished) -> None:
        metrics, usage = self.metrics, event.usage
        if self.last_delta is None and usage.completion_tokens:
            # tokens that decoded to no text yet (a partial character): the client's
            # first content is the final message
            self.delta()
        metrics.e2e_latency.labels(metrics.model_name, event.reason.value).observe(
            time.monotonic() - self.started)
        metrics.prompt_tokens.inc(usage.prompt_tokens)
        metrics.cached_prompt_tokens.inc(usage.cached_prompt_tokens)
        metrics.completion_tokens.inc(usage.completion_tokens)
        metrics.prompt_length.observe(usage.prompt_tokens)
        metrics.generation_length.observe(usage.completion_tokens)

    def failed(self, reason: str) -> None:
        """Ended without a final message: `deadline` or `error`."""
        self.metrics.e2e_latency.labels(self.metrics.model_name, reason).observe(
            time.monotonic() - self.started)


class _EngineCollector:
    def __init__(self, state: ServiceState, model_name: str) -> None:
        self.state = state
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        rss = GaugeMetricFamily("autoglm_process_resident_bytes", "Service process RSS")
        rss.add_metric([], rss_bytes())
        yield rss
        engine = self.state.engine
        if engine is None:
            return
        name = [self.model_name]
        running = engine.running()
        account = engine.kv_account()
        by_owner = account.blocks_by_owner
        running_bytes = min(sum(by_owner.get(r.request_id, 0) for r in running),
                            account.held_blocks) * account.bytes_per_block
        cached_bytes = account.used_bytes - running_bytes
        budget = engine.config.kv_budget_bytes
        yield self._gauge("autoglm_num_requests_running", "Requests in the running batch",
                          len(running))
        yield self._gauge("autoglm_num_requests_waiting",
                          "Requests waiting for admission (preempted ones included)",
                          engine.queued)
        used = GaugeMetricFamily(
            "autoglm_kv_cache_used_bytes",
            "KV cache bytes in use: held by running requests, and held by idle sessions or "
            "cached by content for reuse (evicted first when running requests need room)",
            labels=["model_name", "kind"])
        used.add_metric([*name, "running"], running_bytes)
        used.add_metric([*name, "cached"], cached_bytes)
        yield used
        yield self._gauge("autoglm_kv_cache_budget_bytes", "KV cache budget", budget)
        yield self._gauge(
            "autoglm_kv_cache_usage_ratio",
            "Share of the KV budget in use, running requests and idle caches together, 0 to 1 "
            "(vllm:kv_cache_usage_perc counts evictable cache as free: its equivalent is "
            "kind=running over the budget)",
            account.used_bytes / budget if budget else 0.0)
        yield self._gauge("autoglm_kv_cache_shared_bytes",
                          "KV blocks held by more than one request or session (stored once)",
                          account.shared_bytes)
        yield self._gauge("autoglm_kv_cache_swapped_bytes",
                          "KV copied to host memory: preempted requests, offloaded sessions",
                          account.swapped_bytes)
        cached = GaugeMetricFamily("autoglm_kv_cache_entries",
                                   "Idle KV kept for reuse: sessions, and cached blocks found "
                                   "by content (kind=prefix)",
                                   labels=["model_name", "kind"])
        cached.add_metric([*name, "session"], len(engine.sessions.entries()))
        cached.add_metric([*name, "prefix"], account.cached_blocks)
        yield cached
        weights = GaugeMetricFamily(
            "autoglm_module_weight_bytes",
            "Weight bytes of each module on each device; tier is where the module is "
            "(cuda:N, cpu, or disk with no bytes resident), precision what its Linear "
            "weights are held in (fp32, bf16, fp16, int8, int4, fp8)",
            labels=["model_name", "module", "tier", "device", "precision"])
        for unit in engine.model.units:
            state = unit.state()
            for device, size in (state.bytes_by_device or {state.tier: 0}).items():
                weights.add_metric([*name, state.name, state.tier, device, state.precision],
                                   size)
        yield weights
        admission = GaugeMetricFamily("autoglm_admission_open",
                                      "1 while admission is open, 0 when limited or paused",
                                      labels=["model_name"])
        admission.add_metric(name, 1 if engine.admission.mode == "open" else 0)
        yield admission

    def _gauge(self, metric: str, help_text: str, value: float) -> GaugeMetricFamily:
        gauge = GaugeMetricFamily(metric, help_text, labels=["model_name"])
        gauge.add_metric([self.model_name], value)
        return gauge
