"""deploy/run_autoglm_server.sh on the tiny bundle: three real processes up, then SIGTERM.

The script starts the service, the memory daemon and the gateway on ephemeral ports,
waits for SERVING, and on SIGTERM drains the service, stops the other two and exits 0.
Here (no GPU) the daemon follows the service's pid with the host probe; on a GPU host
the script picks the NVML probe and the expandable-segments allocator by itself.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import REPO, health_status, text_request
from tests.deploy.processes import NOT_UP_YET, free_port, http_get
from tests.support.polling import wait_until

SCRIPT = REPO / "deploy" / "run_autoglm_server.sh"
SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
# where the console scripts are: an installed venv's bin, or AUTOGLM_BIN where the
# project runs from a source tree (the GPU machine's run puts small wrappers there)
BIN = os.environ.get("AUTOGLM_BIN") or str(Path(sys.executable).parent)


def metric_samples(text: str, name: str) -> dict[str, float]:
    """The samples of metric `name` by their label set (the text between the braces)."""
    return {labels or "": float(value) for labels, value in
            re.findall(rf"^{name}(?:{{([^}}]*)}})? (\S+)$", text, re.M)}


def metric_total(text: str, name: str) -> float:
    return sum(metric_samples(text, name).values())


@dataclass
class RunningScript:
    process: subprocess.Popen
    target: str
    run_dir: Path
    log_path: Path
    gateway_port: int
    memd_metrics: str

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children(recursive=True)

    def service(self) -> psutil.Process:
        return next(c for c in self.children() if "autoglm-server" in " ".join(c.cmdline()))


@contextmanager
def start_script(tmp_path: Path, *args: str, **env_overrides: str) -> Iterator[RunningScript]:
    """The script with every port ephemeral and its runtime files in `tmp_path`; yields
    once the service is SERVING, the gateway healthy and the daemon has read the service's
    status through the control socket; kills whatever is left on the way out."""
    gateway_port, memd_metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "AUTOGLM_BIN": BIN,
        "AUTOGLM_PORT": "0", "AUTOGLM_HOST": "127.0.0.1", "AUTOGLM_METRICS_PORT": "0",
        "AUTOGLM_RUN_DIR": str(tmp_path), "AUTOGLM_GRACE_PERIOD": "3",
        "AUTOGLM_START_TIMEOUT": "180",
        "AUTOGLM_GATEWAY_PORT": str(gateway_port),
        "AUTOGLM_MEMD_DAEMON_METRICS_PORT": str(memd_metrics_port),
        "AUTOGLM_MEMD_DAEMON_POLL_INTERVAL_MAX_SECONDS": "0.5",
        **env_overrides,
    }
    log_path = tmp_path / "script.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(SCRIPT), *args, "--log-format", "json"],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        port_file = tmp_path / "autoglm-port.json"

        def serving_port() -> int | None:
            assert process.poll() is None, f"the script exited: {log_path.read_text()[-3000:]}"
            state = json.loads(port_file.read_text())
            return state["serving"] and state["port"]

        port = wait_until(serving_port, 180, "port file serving: true",
                          ignoring=(FileNotFoundError, ValueError, KeyError))
        running = RunningScript(process, f"127.0.0.1:{port}", tmp_path, log_path, gateway_port,
                                f"http://127.0.0.1:{memd_metrics_port}/metrics")
        wait_until(lambda: http_get(f"http://127.0.0.1:{gateway_port}/health")[0] == 200,
                   60, "gateway /health 200", ignoring=NOT_UP_YET)
        wait_until(lambda: metric_total(http_get(running.memd_metrics)[1],
                                        "memd_status_reads_total") > 0,
                   60, "memd read the service status", ignoring=NOT_UP_YET)
        yield running
    finally:
        if process.poll() is None:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()


def stop_cleanly(running: RunningScript) -> None:
    """SIGTERM: the script exits 0, its three processes are gone, the service drained."""
    children = running.children()
    names = " ".join(" ".join(child.cmdline()) for child in children)
    for program in ("autoglm-server", "autoglm-memd", "autoglm-gateway"):
        assert program in names
    running.process.send_signal(signal.SIGTERM)
    assert running.process.wait(60) == 0, running.log_path.read_text()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
    assert not (running.run_dir / "autoglm-control.sock").exists()
    text = running.log_path.read_text()
    assert '"event": "stopped"' in text  # the service drained and stopped itself
    assert "stopped (service exit 0)" in text


def test_starts_all_three_and_stops_them_cleanly_on_sigterm(tiny_bundle, tmp_path):
    with start_script(tmp_path, "--model-dir", str(tiny_bundle),
                      AUTOGLM_MEMD_DAEMON_PROBE="host") as running:
        assert health_status(running.target) == SERVING
        assert (tmp_path / "autoglm-control.sock").is_socket()
        # the daemon measured the service's own process
        assert metric_total(http_get(running.memd_metrics)[1], "memd_device_used_bytes") > 0
        stop_cleanly(running)


@pytest.mark.gpu
def test_on_a_gpu_host_the_script_picks_nvml_and_the_expandable_allocator(tiny_bundle, tmp_path):
    """The GPU branch, chosen by the script itself (no probe named): the service runs on
    cuda:0 with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, the daemon reads every
    GPU through NVML (devices labelled by UUID), and a request is served on the card."""
    with start_script(tmp_path, "--model-dir", str(tiny_bundle), "--device", "cuda:0") as running:
        environ = running.service().environ()
        assert environ.get("PYTORCH_CUDA_ALLOC_CONF") == "expandable_segments:True"
        used = metric_samples(http_get(running.memd_metrics)[1], "memd_device_used_bytes")
        assert used and all('device="GPU-' in labels for labels in used), used
        assert all(value > 0 for value in used.values())
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            decoder = next(m for m in info.modules if m.name == "decoder")
            assert decoder.device == "cuda:0"
            final = list(stub.Generate(text_request("hello", max_new_tokens=4,
                                                    min_new_tokens=4), timeout=60))[-1]
            assert final.final.usage.completion_tokens == 4
        stop_cleanly(running)


def test_a_service_that_cannot_start_fails_the_script(tmp_path):
    env = {**os.environ, "AUTOGLM_BIN": BIN, "AUTOGLM_PORT": "0",
           "AUTOGLM_HOST": "127.0.0.1", "AUTOGLM_METRICS_PORT": "0",
           "AUTOGLM_RUN_DIR": str(tmp_path), "AUTOGLM_GATEWAY_PORT": str(free_port())}
    result = subprocess.run([str(SCRIPT), "--model-dir", str(tmp_path / "no-such-model")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "the service exited before serving" in result.stderr


def plan_env(*args: str) -> dict[str, str]:
    out = subprocess.run([str(Path(BIN) / "autoglm-plan"), *args, "--env"], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_given_only_the_card_size_the_script_starts_the_service_as_planned(
        tiny_bundle, tmp_path):
    """AUTOGLM_GPU_MEMORY_GIB: the service gets the plan's precisions and KV budget in its
    environment, except where the operator set one (here the vision weights)."""
    planned = plan_env(str(tiny_bundle), "--gpus", "0", "--gpu-memory-gib", "3")
    with start_script(tmp_path, "--model-dir", str(tiny_bundle),
                      AUTOGLM_MEMD_DAEMON_PROBE="host", AUTOGLM_GPU_MEMORY_GIB="3",
                      AUTOGLM_VISION_WEIGHTS="fp32") as running:
        environ = running.service().environ()
        assert environ["AUTOGLM_DECODER_WEIGHTS"] == planned["AUTOGLM_DECODER_WEIGHTS"] == "auto"
        assert environ["AUTOGLM_KV_BUDGET_MB"] == planned["AUTOGLM_KV_BUDGET_MB"]
        assert int(planned["AUTOGLM_KV_BUDGET_MB"]) > 1024
        assert environ["AUTOGLM_VISION_WEIGHTS"] == "fp32"
        assert environ["AUTOGLM_DEVICE"] == planned["AUTOGLM_DEVICE"] == "cpu"
        assert "plan for 3 GiB: AUTOGLM_KV_BUDGET_MB=" in running.log_path.read_text()
        stop_cleanly(running)


def test_a_card_too_small_for_the_model_stops_the_script_before_it_starts(tiny_bundle,
                                                                          tmp_path):
    env = {**os.environ, "AUTOGLM_BIN": BIN, "AUTOGLM_RUN_DIR": str(tmp_path),
           "AUTOGLM_GPU_MEMORY_GIB": "0.5", "AUTOGLM_PLAN_GPUS": "0"}
    result = subprocess.run([str(SCRIPT), f"--model-dir={tiny_bundle}"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not fit a host with 0.5 GiB" in result.stderr
    assert "service pid" not in result.stderr
    assert not (tmp_path / "autoglm-port.json").exists()
