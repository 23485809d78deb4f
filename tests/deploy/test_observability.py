"""deploy/prometheus and deploy/grafana against the real thing: the service, the memory
daemon and the gateway run as processes, take a short mixed load, and are scraped; every
metric the dashboard and the rules name must be in those scrapes, the rules and the
scrapes pass promtool, and every dashboard query compiles."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import start_server
from tests.deploy.processes import NOT_UP_YET, free_port
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "autoglm-serve.json"
METRIC_NAME = re.compile(r"\b(?:autoglm|memd)_[a-zA-Z0-9_]+")
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$model_name": ".*"}
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed")


def text_request(text: str, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])], **fields)


def mixed_load(target: str, gateway_url: str) -> None:
    """A little of everything: whole and streamed answers, a session, a client error, a
    cancelled stream, and the gateway's success, 4xx and unknown route."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        list(stub.Generate(text_request("hello", session_id="obs-1",
                                        sampling=pb.SamplingParams(max_new_tokens=4))))
        list(stub.Generate(text_request("hello again", session_id="obs-1",
                                        sampling=pb.SamplingParams(max_new_tokens=4))))
        with contextlib.suppress(grpc.RpcError):
            list(stub.Generate(pb.GenerateRequest()))
        call = stub.Generate(text_request(
            "go on", sampling=pb.SamplingParams(max_new_tokens=200, min_new_tokens=200)))
        next(call)
        call.cancel()
        stub.CountTokens(pb.CountTokensRequest(messages=[pb.Message(
            role=pb.ROLE_USER, parts=[pb.Part(text="count me")])]))
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        assert http.post("/v1/chat/completions", json={
            "model": "autoglm-phone-9b", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
        assert http.post("/v1/chat/completions", json={}).status_code == 400
        assert http.get("/missing").status_code == 404


@pytest.fixture(scope="module")
def scrapes(tiny_bundle, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The /metrics text of the service, the daemon and the gateway after a mixed load."""
    workdir = tmp_path_factory.mktemp("observability")
    service_port, memd_port, gateway_port = free_port(), free_port(), free_port()
    server = start_server(workdir / "server", tiny_bundle, "--metrics-port", str(service_port))
    processes: list[subprocess.Popen] = []
    try:
        with (workdir / "memd.log").open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "memory_daemon", "--probe", "host",
                 "--pid", str(server.pid), "--host-budget-bytes", str(16 * 2**30),
                 "--control", server.control_target, "--poll-interval", "0.2",
                 "--metrics-port", str(memd_port), "--dry-run"],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        with (workdir / "gateway.log").open("w") as log:
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "gateway", "--port", str(gateway_port),
                 "--grpc-target", server.target], stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        urls = {"service": f"http://127.0.0.1:{service_port}/metrics",
                "memd": f"http://127.0.0.1:{memd_port}/metrics",
                "gateway": f"http://127.0.0.1:{gateway_port}/metrics"}
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_until(lambda: httpx.get(f"{gateway_url}/health", timeout=2).status_code == 200, 60,
                   "gateway /health 200", ignoring=NOT_UP_YET)
        mixed_load(server.target, gateway_url)
        wait_until(lambda: "memd_device_used_bytes{" in httpx.get(urls["memd"], timeout=5).text,
                   60, "the daemon took a reading", ignoring=NOT_UP_YET)
        # the cancelled stream is counted once the service has seen the cancel
        wait_until(lambda: 'code="CANCELLED"' in httpx.get(urls["service"], timeout=5).text, 60,
                   "the cancelled RPC is counted", ignoring=NOT_UP_YET)
        yield {name: httpx.get(url, timeout=10).text for name, url in urls.items()}
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        server.terminate()


def sample_names(scrapes: dict[str, str]) -> set[str]:
    return {sample.name for text in scrapes.values()
            for family in text_string_to_metric_families(text) for sample in family.samples}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"]
            for target in panel.get("targets", ())]


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS / "autoglm-rules.yaml").read_text())["groups"]
    return [(rule.get("record") or rule["alert"], rule["expr"])
            for group in groups for rule in group["rules"]]


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    graphs = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]


def test_every_dashboard_query_names_a_metric_the_processes_export(scrapes) -> None:
    exported = sample_names(scrapes)
    named_by_dashboard = set()
    for title, expr in dashboard_queries():
        names = set(METRIC_NAME.findall(expr))
        assert names, f"{title}: {expr} names no metric"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported"
        named_by_dashboard |= names
    # the dashboard covers all three processes
    assert any(n.startswith("memd_") for n in named_by_dashboard)
    assert any(n.startswith("autoglm_gateway_") for n in named_by_dashboard)


def test_every_rule_names_a_metric_the_processes_export(scrapes) -> None:
    exported = sample_names(scrapes)
    for name, expr in rule_expressions():
        missing = set(METRIC_NAME.findall(expr)) - exported
        assert not missing, f"{name}: {sorted(missing)} not exported"


@needs_promtool
def test_rules_config_and_rule_tests_pass_promtool() -> None:
    for args in (["check", "rules", "autoglm-rules.yaml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "autoglm-rules.test.yaml"]):
        result = subprocess.run(["promtool", *args], cwd=PROMETHEUS, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_every_dashboard_query_compiles(tmp_path) -> None:
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("process", ["service", "memd", "gateway"])
def test_each_exposition_passes_promtool_check_metrics(scrapes, process: str) -> None:
    result = subprocess.run(["promtool", "check", "metrics"], input=scrapes[process],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
