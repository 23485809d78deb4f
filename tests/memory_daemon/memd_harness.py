"""Real-process harness: the daemon as a subprocess, its JSON events, the service's status."""

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from autoglm.control.v1 import control_service_pb2 as control_pb
from autoglm.control.v1 import control_service_pb2_grpc as control_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.support.polling import wait_until

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30


class DaemonProcess:
    """`python -m memory_daemon` with its stdout parsed into events as they arrive."""

    def __init__(self, args: Iterable[str], env: dict[str, str] | None = None) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "memory_daemon", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            with self._lock:
                self.events.append(event)

    def named(self, name: str) -> list[dict]:
        with self._lock:
            return [event for event in self.events if event.get("event") == name]

    def actions(self) -> list[dict]:
        return self.named("memd.action")

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0) -> None:
        """Wait until `predicate` holds; fail at once if the daemon exits first."""

        def holds() -> bool:
            if predicate():
                return True
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}")
            return False

        try:
            wait_until(holds, timeout, "the awaited daemon condition", interval=0.02)
        except AssertionError as error:
            raise AssertionError(f"{error}: {self.tail()}") from None

    def wait_exit(self, timeout: float = 60.0) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)

    def tail(self) -> str:
        stderr = ""
        if self.process.poll() is not None and self.process.stderr is not None:
            stderr = self.process.stderr.read()
        with self._lock:
            last = self.events[-8:]
        return f"events: {last} stderr: {stderr[-2000:]}"


def write_policy(path: Path, **policy: float) -> Path:
    """A TOML config with fast, deterministic policy settings for end-to-end runs."""
    settings = {
        "transition_seconds": 0.5,
        "prefetch_free_fraction": 0.0,  # encoders come back lazily, on the next request
        "gc_every_seconds": 0.0,
        **policy,
    }
    lines = ["[policy]", *(f"{key} = {value}" for key, value in settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_trace(path: Path, phases: list[tuple[float, float]], step: float, total: int) -> Path:
    """Rows every `step` seconds: each phase is (seconds, used fraction)."""
    rows, t = [], 0.0
    for seconds, fraction in phases:
        for _ in range(round(seconds / step)):
            rows.append(
                {"t": round(t, 3), "device": "GPU-0", "used": int(fraction * total), "total": total}
            )
            t += step
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class Service:
    """Stubs on a running server's public and control targets."""

    def __init__(self, target: str, control_target: str) -> None:
        self._channel = grpc.insecure_channel(target)
        self._control_channel = grpc.insecure_channel(control_target)
        self.inference = pb_grpc.InferenceServiceStub(self._channel)
        self.control = control_grpc.ControlServiceStub(self._control_channel)

    def close(self) -> None:
        self._channel.close()
        self._control_channel.close()

    def status(self) -> control_pb.MemoryStatus:
        return self.control.GetMemoryStatus(control_pb.GetMemoryStatusRequest(), timeout=10).status

    def tiers(self) -> dict[str, int]:
        return {module.name: module.tier for module in self.status().modules}

    def generate(
        self, *parts: pb.Part, session_id: str = "", timeout: float = 60
    ) -> pb.FinalMessage:
        request = pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, parts=list(parts))],
            sampling=pb.SamplingParams(max_new_tokens=4, min_new_tokens=0, seed=1),
            session_id=session_id,
        )
        responses = list(self.inference.Generate(request, timeout=timeout))
        assert responses[-1].HasField("final")
        return responses[-1].final

    def open_sessions(self, count: int) -> list[str]:
        """Generate once per session so each leaves an idle cached KV entry."""
        ids = [f"agent-{n}" for n in range(count)]
        for session_id in ids:
            prompt = pb.Part(text=f"step one of task {session_id} " * 4)
            self.generate(prompt, session_id=session_id)
        return ids


def session_ids(status: control_pb.MemoryStatus) -> set[str]:
    return {session.session_id for session in status.sessions}
