"""Shared fixtures: tiny model bundles and real server processes on loopback ports."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    from tests.fixtures.tiny_models import write_tiny_bundle

    return write_tiny_bundle(tmp_path_factory.mktemp("bundles") / "tiny")


@dataclass
class ServerProcess:
    """A running autoglm-server: its public target, control target, pid and log."""

    process: subprocess.Popen
    port: int
    control_socket: Path
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None  # how the public port is reached

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def control_target(self) -> str:
        return f"unix://{self.control_socket}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return lines

    def terminate(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def start_server(
    workdir: Path, model_dir: Path | None, *extra: str, wait: bool = True,
    timeout: float = 180.0, env: dict[str, str] | None = None,
    module: str = "inference_svc.cli",
    credentials: grpc.ChannelCredentials | None = None,
) -> ServerProcess:
    """Start autoglm-server; `credentials` reach its public port when it serves TLS."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port.json"
    port_file.unlink(missing_ok=True)  # a restart in the same workdir must not read the old one
    control = workdir / "control.sock"
    log_path = workdir / "server.log"
    args = [
        sys.executable, "-m", module, "--host", "127.0.0.1", "--port", "0",
        "--port-file", str(port_file), "--control-socket", str(control),
        "--log-format", "json", "--grace-period", "5", *extra,
    ]
    if model_dir is not None:
        args += ["--model-dir", str(model_dir)]
    log = log_path.open("w")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                               env={**os.environ, **(env or {})})
    server = ServerProcess(process, 0, control, log_path, credentials)
    if wait:
        wait_until_serving(server, port_file, timeout)
    return server


def wait_until_serving(server: ServerProcess, port_file: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_path.read_text()[-4000:]}")
        if port_file.exists() and port_file.stat().st_size:
            server.port = json.loads(port_file.read_text())["port"]
            with open_channel(server.target, server.credentials) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        time.sleep(0.1)
    server.terminate()
    tail = server.log_path.read_text()[-4000:]
    raise TimeoutError(f"server not SERVING after {timeout}s:\n{tail}")


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


@pytest.fixture(scope="session")
def inference_server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server on the tiny random bundle, shared by the whole session."""
    server = start_server(tmp_path_factory.mktemp("server"), tiny_bundle)
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def default_model_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server on the embedded default model (slow to start: shared)."""
    server = start_server(tmp_path_factory.mktemp("default-server"), None, timeout=600)
    yield server
    server.terminate()


def png_bytes(size: tuple[int, int] = (96, 64), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> bytes:
    """A 16-bit mono sine-wave WAV, written with the stdlib only."""
    count = int(seconds * rate)
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * freq * i / rate)))
        for i in range(count)
    )
    header = b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    return header + b"data" + struct.pack("<I", len(samples)) + samples


def health_status(
    target: str, service: str = "", credentials: grpc.ChannelCredentials | None = None
) -> int:
    with open_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A throwaway CA with a loopback server certificate and a client certificate."""
    from tests.pki import write_pki

    return write_pki(tmp_path_factory.mktemp("pki"))
