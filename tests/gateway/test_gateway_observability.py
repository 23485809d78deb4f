"""The gateway as a real process: JSON log lines only, one access line per request
(4xx and client disconnects included), and /metrics, in front of the real service."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
MODEL = "autoglm-phone-9b"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class GatewayProcess:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process, self.url, self.log_path = process, url, log_path

    def raw_lines(self) -> list[str]:
        return [line for line in self.log_path.read_text().splitlines() if line.strip()]

    def access_lines(self) -> list[dict[str, Any]]:
        events = (json.loads(line) for line in self.raw_lines())
        return [event for event in events if event.get("event") == "http_request"]

    def access_line(self, request_id: str) -> dict[str, Any] | None:
        return next((e for e in self.access_lines() if e.get("request_id") == request_id), None)


@pytest.fixture(scope="module")
def gateway(inference_server: Any, tmp_path_factory) -> Iterator[GatewayProcess]:
    port = free_port()
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1",
             "--port", str(port), "--grpc-target", inference_server.target],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, log_path.read_text()[-4000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 60, "gateway /health 200")
    yield GatewayProcess(process, url, log_path)
    process.terminate()
    process.wait(30)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_counted(samples: dict, route: str, status: int, method: str = "POST") -> float:
    key = ("autoglm_gateway_http_requests_total",
           (("method", method), ("route", route), ("status", str(status))))
    return samples.get(key, 0.0)


def test_every_line_is_json_with_one_access_line_per_request(gateway: GatewayProcess) -> None:
    ok_id, bad_id = f"gw-ok-{uuid.uuid4().hex[:8]}", f"gw-bad-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        reply = http.post("/v1/chat/completions", headers={"x-request-id": ok_id}, json={
            "model": MODEL, "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]})
        assert reply.status_code == 200
        assert reply.headers["x-request-id"] == ok_id
        invalid = http.post("/v1/chat/completions", headers={"x-request-id": bad_id},
                            json={"model": MODEL})
        assert invalid.status_code == 400
        assert invalid.headers["x-request-id"] == bad_id
        unknown = http.get("/no/such/route")
        assert unknown.status_code == 404
        generated_id = unknown.headers["x-request-id"]

    ok = wait_until(lambda: gateway.access_line(ok_id))
    assert ok["method"] == "POST" and ok["path"] == "/v1/chat/completions"
    assert ok["route"] == "/v1/chat/completions" and ok["status"] == 200
    assert ok["duration_s"] >= 0 and ok["level"] == "info" and "timestamp" in ok
    assert wait_until(lambda: gateway.access_line(bad_id))["status"] == 400
    missing = wait_until(lambda: gateway.access_line(generated_id))
    assert (missing["status"], missing["route"], missing["path"]) == (404, "unmatched",
                                                                       "/no/such/route")
    lines = gateway.raw_lines()
    assert all(json.loads(line) for line in lines)  # uvicorn's own lines included
    assert any(json.loads(line).get("logger") == "uvicorn.error" for line in lines)


def test_a_client_that_leaves_mid_stream_is_a_499_and_a_cancelled_rpc(
    gateway: GatewayProcess, inference_server: Any
) -> None:
    with grpc.insecure_channel(inference_server.target) as channel:
        info = pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    long_generation = info.context_length - 64
    request_id = f"gw-leave-{uuid.uuid4().hex[:8]}"
    before = scrape(gateway.url)
    body = {"model": MODEL, "stream": True, "max_tokens": long_generation,
            "min_tokens": long_generation, "messages": [{"role": "user", "content": "go"}]}
    with (
        httpx.Client(base_url=gateway.url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body,
                    headers={"x-request-id": request_id}) as response,
    ):
        assert response.status_code == 200
        assert next(response.iter_lines()).startswith("data: ")

    line = wait_until(lambda: gateway.access_line(request_id))
    assert line["status"] == 499 and line["response_status"] == 200
    after = scrape(gateway.url)
    route = "/v1/chat/completions"
    assert requests_counted(after, route, 499) == requests_counted(before, route, 499) + 1

    def service_finished() -> dict[str, Any] | None:
        return next((e for e in inference_server.log_lines() if e.get("event") == "rpc_finished"
                     and e.get("request_id") == request_id), None)

    assert wait_until(service_finished)["status"] == "CANCELLED"


def test_metrics_count_requests_by_route_and_status(gateway: GatewayProcess) -> None:
    before = scrape(gateway.url)
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        assert http.get("/v1/models").status_code == 200
        assert http.get("/nowhere").status_code == 404
    after = scrape(gateway.url)
    assert (requests_counted(after, "/v1/models", 200, "GET")
            == requests_counted(before, "/v1/models", 200, "GET") + 1)
    assert (requests_counted(after, "unmatched", 404, "GET")
            == requests_counted(before, "unmatched", 404, "GET") + 1)
    assert after[("autoglm_gateway_info", (("model_name", MODEL),))] == 1
    assert after[("autoglm_gateway_http_request_duration_seconds_count",
                  (("method", "GET"), ("route", "/v1/models")))] >= 1


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_finds_the_gateway_exposition_clean(gateway: GatewayProcess) -> None:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    result = subprocess.run(["promtool", "check", "metrics"], input=text,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
