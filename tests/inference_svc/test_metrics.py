"""Prometheus metrics scraped from a real server."""

from __future__ import annotations

import contextlib
import socket
import urllib.request

import grpc
from prometheus_client.parser import text_string_to_metric_families

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import start_server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_tokens_rpcs_and_show_module_residency(tiny_bundle, tmp_path):
    port = free_port()
    server = start_server(tmp_path / "s", tiny_bundle, "--metrics-port", str(port))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            for _ in range(2):
                list(stub.Generate(pb.GenerateRequest(
                    messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="hi")])],
                    sampling=pb.SamplingParams(max_new_tokens=5, min_new_tokens=5))))
            with contextlib.suppress(grpc.RpcError):
                list(stub.Generate(pb.GenerateRequest()))
        samples = scrape(port)
    finally:
        server.terminate()
    generate = "/autoglm.inference.v1.InferenceService/Generate"
    assert samples[("autoglm_completion_tokens_total", ())] == 10
    assert samples[("autoglm_rpcs_total", (("code", "OK"), ("method", generate)))] == 2
    assert samples[("autoglm_rpcs_total",
                    (("code", "INVALID_ARGUMENT"), ("method", generate)))] == 1
    assert samples[("autoglm_time_to_first_token_seconds_count", ())] == 2
    assert samples[("autoglm_module_weight_bytes", (("module", "vision"), ("tier", "cpu")))] > 0
    assert samples[("autoglm_running_requests", ())] == 0
    assert samples[("autoglm_admission_open", ())] == 1
