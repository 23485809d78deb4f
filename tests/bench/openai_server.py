"""OpenAI-compatible servers as subprocesses: `transformers serve`, and our gateway."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.config import DEFAULT_MODEL_NAME
from tests.conftest import REPO


@dataclass
class OpenAIServer:
    process: subprocess.Popen
    base_url: str
    model: str
    log_path: Path

    def terminate(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_transformers_serve(decoder_dir: Path, workdir: Path, *, continuous_batching: bool,
                             timeout: float = 300.0) -> OpenAIServer:
    """Serve `decoder_dir` (force-loaded, float32 on CPU); returns once /health answers."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    batching = "--continuous-batching" if continuous_batching else "--no-continuous-batching"
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve", str(decoder_dir),
        "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
        batching, "--log-level", "warning",
    ]
    log_path = workdir / "transformers-serve.log"
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    server = OpenAIServer(process, f"http://127.0.0.1:{port}", str(decoder_dir), log_path)
    wait_until_healthy(server, timeout)
    return server


def start_gateway(upstream_target: str, workdir: Path, *, timeout: float = 60.0
                  ) -> OpenAIServer:
    """Our OpenAI gateway (`python -m gateway`) in front of `upstream_target`, as its own
    process; returns once /health answers, that is once the upstream is SERVING."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
               "--grpc-target", upstream_target, "--log-level", "warning"]
    log_path = workdir / "gateway.log"
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                               cwd=REPO)
    server = OpenAIServer(process, f"http://127.0.0.1:{port}", DEFAULT_MODEL_NAME, log_path)
    wait_until_healthy(server, timeout)
    return server


def wait_until_healthy(server: OpenAIServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.process.args[:3]} exited:\n"
                               f"{server.log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"{server.process.args[:3]} not healthy after {timeout}s:\n"
                       f"{server.log_path.read_text()[-4000:]}")
