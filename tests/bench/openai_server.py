"""transformers' own OpenAI-compatible server (`transformers serve`) as a subprocess."""

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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited:\n{log_path.read_text()[-4000:]}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"transformers serve not healthy after {timeout}s:\n"
                       f"{log_path.read_text()[-4000:]}")
