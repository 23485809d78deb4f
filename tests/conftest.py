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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from autoglm.control.v1 import control_service_pb2_grpc as cpb_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parent.parent
SERVING = health_pb2.HealthCheckResponse.SERVING


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

    def wait_for_log(self, event: str, request_id: str, timeout: float = 60.0) -> dict:
        """The first log line of `event` for `request_id`, once the server has written it."""

        def logged() -> dict | None:
            return next((line for line in self.log_lines()
                         if line.get("event") == event and line.get("request_id") == request_id),
                        None)

        return wait_until(logged, timeout, f"a {event} log line for {request_id}")

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
    def serving() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited early:\n{server.log_path.read_text()[-4000:]}")
        if not (port_file.exists() and port_file.stat().st_size):
            return False
        server.port = json.loads(port_file.read_text())["port"]
        return health_status(server.target, credentials=server.credentials) == SERVING

    try:
        wait_until(serving, timeout, "the server SERVING", interval=0.1)
    except AssertionError:
        server.terminate()
        raise TimeoutError(f"server not SERVING after {timeout}s:\n"
                           f"{server.log_path.read_text()[-4000:]}") from None


@contextmanager
def running_server(workdir: Path, model_dir: Path | None, *extra: str,
                   **options) -> Iterator[ServerProcess]:
    """`start_server` for the length of a `with` block; the server is stopped after it."""
    server = start_server(workdir, model_dir, *extra, **options)
    try:
        yield server
    finally:
        server.terminate()


def open_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


@pytest.fixture(scope="session")
def inference_server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server on the tiny random bundle, shared by the whole session."""
    with running_server(tmp_path_factory.mktemp("server"), tiny_bundle) as server:
        yield server


@pytest.fixture(scope="session")
def default_model_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """One real server on the embedded default model (slow to start: shared)."""
    with running_server(tmp_path_factory.mktemp("default-server"), None, timeout=600) as server:
        yield server


@pytest.fixture(scope="module")
def own_server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """A tiny-model server of the requesting module's own, so that the module's traffic
    (fuzzing, hostile clients, admission changes) disturbs no other test."""
    with running_server(tmp_path_factory.mktemp("own-server"), tiny_bundle) as server:
        yield server


@pytest.fixture(scope="module")
def server(inference_server) -> ServerProcess:
    """The server a module's tests talk to: the shared one, unless the module overrides
    this fixture (with `own_server`, or a server started with its own flags)."""
    return inference_server


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    """A channel to `server`'s public port."""
    with open_channel(server.target, server.credentials) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def control(server) -> Iterator[cpb_grpc.ControlServiceStub]:
    """A client stub of `server`'s control API (its Unix socket)."""
    with grpc.insecure_channel(server.control_target) as channel:
        yield cpb_grpc.ControlServiceStub(channel)


def text_request(text: str, **sampling) -> pb.GenerateRequest:
    """A Generate request of one user turn of text, with these sampling fields."""
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])],
        sampling=pb.SamplingParams(**sampling),
    )


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
