"""Prometheus metrics scraped from a real server."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, start_server
from tests.support.polling import wait_until

GENERATE = "/autoglm.inference.v1.InferenceService/Generate"
MODEL = (("model_name", "autoglm-phone-9b"),)

Samples = dict[tuple[str, tuple], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape_text(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def scrape(port: int) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(scrape_text(port)):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def text_request(text: str, session_id: str = "", **sampling: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])],
        sampling=pb.SamplingParams(**sampling), session_id=session_id)


@pytest.fixture(scope="module")
def metered(tiny_bundle, tmp_path_factory) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("metered"), tiny_bundle,
                          "--metrics-port", str(port))
    yield server, port
    server.terminate()


def test_metrics_count_tokens_rpcs_lengths_and_latencies(metered):
    server, port = metered
    before = scrape(port)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        gaps = 0  # between consecutive text messages of one call: what the histogram counts
        for _ in range(2):
            replies = list(stub.Generate(text_request("hi", max_new_tokens=5, min_new_tokens=5)))
            deltas = [r for r in replies if not r.HasField("final")
                      and not r.HasField("choice_end")]
            gaps += max(0, len(deltas) - 1)
        with contextlib.suppress(grpc.RpcError):
            list(stub.Generate(pb.GenerateRequest()))
    after = scrape(port)

    def grew(name: str, labels: tuple = MODEL) -> float:
        key = (name, tuple(sorted(labels)))
        return after[key] - before.get(key, 0)

    assert grew("autoglm_completion_tokens_total") == 10
    assert grew("autoglm_rpcs_total", (("code", "OK"), ("method", GENERATE))) == 2
    assert grew("autoglm_rpcs_total", (("code", "INVALID_ARGUMENT"), ("method", GENERATE))) == 1
    assert grew("autoglm_time_to_first_token_seconds_count") == 2
    # deltas queued while the stream waits are sent as one message, so how many gaps two
    # five-token calls have depends on timing; the histogram counts exactly those sent
    assert grew("autoglm_inter_token_latency_seconds_count") == gaps
    assert grew("autoglm_e2e_request_latency_seconds_count",
                (("finished_reason", "length"), *MODEL)) == 2
    assert grew("autoglm_request_generation_tokens_count") == 2
    assert grew("autoglm_request_generation_tokens_bucket", (("le", "5.0"), *MODEL)) == 2
    assert grew("autoglm_request_generation_tokens_bucket", (("le", "2.0"), *MODEL)) == 0
    assert grew("autoglm_request_prompt_tokens_sum") == grew("autoglm_prompt_tokens_total") > 0
    assert after[("autoglm_module_weight_bytes",
                  (("device", "cpu"), *MODEL, ("module", "vision"), ("precision", "fp32"),
                   ("tier", "cpu")))] > 0
    assert after[("autoglm_num_requests_running", MODEL)] == 0
    assert after[("autoglm_admission_open", MODEL)] == 1
    # reported by the engine as it schedules: present from the start
    assert ("autoglm_num_preemptions_total", MODEL) in after
    assert ("autoglm_request_queue_time_seconds_count", MODEL) in after


def test_running_kv_shows_in_usage_and_a_cancelled_stream_counts_as_cancelled(metered):
    server, port = metered
    cancelled = (("code", "CANCELLED"), ("method", GENERATE))
    before = scrape(port)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        call = stub.Generate(text_request("Tell me a long story", max_new_tokens=2000,
                                          min_new_tokens=2000),
                             metadata=[("x-request-id", "rid-metrics-cancel")])
        next(call)  # generating now
        during = scrape(port)
        call.cancel()

        def counted() -> bool:
            return scrape(port).get(("autoglm_rpcs_total", cancelled), 0) > before.get(
                ("autoglm_rpcs_total", cancelled), 0)

        wait_until(counted, 30, "the cancelled RPC counted")
    assert during[("autoglm_num_requests_running", MODEL)] == 1
    running = during[("autoglm_kv_cache_used_bytes", (("kind", "running"), *MODEL))]
    cached = during[("autoglm_kv_cache_used_bytes", (("kind", "cached"), *MODEL))]
    budget = during[("autoglm_kv_cache_budget_bytes", MODEL)]
    assert running > 0
    assert during[("autoglm_kv_cache_usage_ratio", MODEL)] == pytest.approx(
        (running + cached) / budget)
    after = scrape(port)
    key = ("autoglm_e2e_request_latency_seconds_count",
           (("finished_reason", "cancelled"), *MODEL))
    assert after[key] == before[key] + 1
    server.wait_for_log("rpc_finished", "rid-metrics-cancel")
    [finished] = [line for line in server.log_lines() if line.get("event") == "rpc_finished"
                  and line.get("request_id") == "rid-metrics-cancel"]
    assert finished["status"] == "CANCELLED"
    assert finished["rpc"] == GENERATE


def test_a_session_turn_leaves_cached_kv_and_an_entry(metered):
    server, port = metered
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        list(stub.Generate(text_request("remember this for later please", "metrics-s1",
                                        max_new_tokens=4)))
        samples = scrape(port)
        pb_grpc.InferenceServiceStub(channel).EndSession(
            pb.EndSessionRequest(session_id="metrics-s1"))
    assert samples[("autoglm_kv_cache_entries", (("kind", "session"), *MODEL))] >= 1
    assert samples[("autoglm_kv_cache_used_bytes", (("kind", "cached"), *MODEL))] > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_the_exposition_clean(metered):
    _, port = metered
    result = subprocess.run(["promtool", "check", "metrics"], input=scrape_text(port),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""
