"""Soak: hours of mixed traffic must not grow the server's memory once sessions are steady.

Several clients talk to one server on the tiny bundle at once (the model is small so the
serving stack, not the matmuls, is what runs most). Each client keeps a session whose
conversation grows turn by turn with text, images and audio, then ends it and starts a
new one, so session caches are made, extended and dropped all the time.

The run lasts AUTOGLM_SOAK_SECONDS (default 1800) or, when set, AUTOGLM_SOAK_REQUESTS
requests. A sample is taken every minute, or every twelfth of the run when that is shorter
(AUTOGLM_SOAK_SAMPLE_SECONDS overrides): the server's RSS (psutil on its pid) and its KV
bytes, running requests and cached sessions from the control account. Each sample prints;
all of them go to $BENCH_OUT/soak.json.

The bound: a least-squares line through the RSS of the last half of the samples (the first
half lets caches, allocator pools and session counts settle) must rise less than
RSS_SLOPE_MB_PER_MIN = 5 MB per minute, and less than RSS_SLOPE_MB_PER_100 = 5 MB per 100
requests. Every request must succeed, and when traffic stops and the sessions are ended,
no running request holds KV and no soak session stays cached.

    AUTOGLM_SOAK_SECONDS=120 .venv/bin/python -m pytest tests/bench/test_soak.py -m bench -s
"""

from __future__ import annotations

import io
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import grpc
import numpy as np
import psutil
import pytest
from PIL import Image

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import report
from tests.conftest import ServerProcess, start_server, wav_bytes
from tests.inference_svc.liveness import memory_status, wait_for_no_running_kv

pytestmark = [pytest.mark.bench, pytest.mark.timeout(4 * 3600)]

RSS_SLOPE_MB_PER_MIN = 5.0
RSS_SLOPE_MB_PER_100 = 5.0
CLIENTS = 4
TURNS_PER_SESSION = 6
CALL_TIMEOUT = 120.0  # a hang bound per request
MB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("soak"), tiny_bundle)
    yield server
    server.terminate()


def image_bytes(rng: random.Random) -> bytes:
    size = rng.choice([(64, 64), (200, 120), (640, 480), (1280, 720)])
    color = tuple(rng.randrange(256) for _ in range(3))
    buffer = io.BytesIO()
    kind = rng.choice(["PNG", "JPEG"])
    Image.new("RGB", size, color).save(buffer, kind)
    return buffer.getvalue()


def user_turn(rng: random.Random, turn: int) -> pb.Message:
    parts = [pb.Part(text=f"turn {turn}: " + " ".join(rng.choices(WORDS, k=rng.randint(4, 30))))]
    kind = rng.random()
    if kind < 0.3:
        parts.append(pb.Part(image=pb.Image(data=image_bytes(rng))))
    elif kind < 0.5:
        clip = wav_bytes(rng.uniform(0.1, 1.5), rate=rng.choice([8000, 16000]),
                         freq=rng.uniform(200, 900))
        parts.append(pb.Part(audio=pb.Audio(wav=clip)))
    return pb.Message(role=pb.ROLE_USER, parts=parts)


WORDS = ["open", "the", "calendar", "tap", "settings", "screen", "button", "move", "next",
         "week", "message", "photo", "what", "is", "shown", "here", "listen", "to", "clip"]


@dataclass
class Sample:
    elapsed_s: float
    requests: int
    rss_bytes: int
    kv_bytes: int
    running_requests: int
    cached_sessions: int


class Soak:
    """The shared state of one soak run: its clients' counters and its stop condition."""

    def __init__(self, server: ServerProcess, seconds: float, requests: int | None) -> None:
        self.server = server
        self.seconds = seconds
        self.max_requests = requests
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.requests = 0
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []

    def done(self) -> bool:
        if self.max_requests is not None:
            return self.requests >= self.max_requests
        return time.monotonic() - self.started >= self.seconds

    def record(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.requests += 1
            self.outcomes[outcome] += 1
            if outcome != "OK" and len(self.failures) < 20:
                self.failures.append(f"{outcome}: {detail[:200]}")

    def client(self, index: int) -> None:
        rng = random.Random(index)
        with grpc.insecure_channel(self.server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            generation = 0
            while not self.stop.is_set():
                session_id = f"soak-{index}-{generation}"
                history: list[pb.Message] = [pb.Message(role=pb.ROLE_SYSTEM, parts=[
                    pb.Part(text=f"client {index} session {generation}: answer briefly")])]
                for turn in range(TURNS_PER_SESSION):
                    if self.stop.is_set():
                        break
                    history.append(user_turn(rng, turn))
                    reply = self.generate(stub, history, session_id, rng)
                    if reply is None:
                        break
                    history.append(pb.Message(role=pb.ROLE_ASSISTANT,
                                              parts=[pb.Part(text=reply or "ok")]))
                try:
                    stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=30)
                except grpc.RpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        self.record(f"EndSession {error.code().name}", error.details() or "")
                generation += 1

    def generate(self, stub, history, session_id: str, rng: random.Random) -> str | None:
        request = pb.GenerateRequest(
            messages=history, session_id=session_id,
            sampling=pb.SamplingParams(max_new_tokens=rng.randint(4, 24), temperature=0.8,
                                       top_p=0.95, seed=rng.randrange(2**32)),
        )
        try:
            responses = list(stub.Generate(request, timeout=CALL_TIMEOUT))
        except grpc.RpcError as error:
            self.record(error.code().name, error.details() or "")
            return None
        if not responses or not responses[-1].HasField("final"):
            self.record("NO_FINAL")
            return None
        self.record("OK")
        return "".join(r.text_delta for r in responses)

    def sample(self) -> Sample:
        status = memory_status(self.server)
        return Sample(
            elapsed_s=time.monotonic() - self.started, requests=self.requests,
            rss_bytes=psutil.Process(self.server.pid).memory_info().rss,
            kv_bytes=status.kv_bytes, running_requests=status.running_requests,
            cached_sessions=len(status.sessions),
        )


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) >= 2 and len(set(xs)) >= 2 else 0.0


def show(sample: Sample) -> str:
    return (f"t={sample.elapsed_s:7.1f}s  requests={sample.requests:6d}  "
            f"rss={sample.rss_bytes / MB:8.1f} MB  kv={sample.kv_bytes / MB:7.2f} MB  "
            f"running={sample.running_requests}  sessions={sample.cached_sessions}")


def test_soak_rss_is_flat_once_sessions_are_steady(server):
    seconds = float(os.environ.get("AUTOGLM_SOAK_SECONDS", 1800))
    requests = os.environ.get("AUTOGLM_SOAK_REQUESTS")
    soak = Soak(server, seconds, int(requests) if requests else None)
    interval = float(os.environ.get("AUTOGLM_SOAK_SAMPLE_SECONDS", min(60.0, seconds / 12)))
    clients = [threading.Thread(target=soak.client, args=(i,), daemon=True)
               for i in range(CLIENTS)]
    for thread in clients:
        thread.start()
    samples = [soak.sample()]
    print(f"\nsoak: {CLIENTS} clients, {soak.max_requests or f'{seconds:.0f} s'}, "
          f"a sample every {interval:.0f} s\n{show(samples[0])}")
    next_sample = time.monotonic() + interval
    while not soak.done():
        assert server.process.poll() is None, "the server exited during the soak"
        if time.monotonic() >= next_sample:
            samples.append(soak.sample())
            print(show(samples[-1]), flush=True)
            next_sample += interval
        time.sleep(0.2)
    soak.stop.set()
    for thread in clients:
        thread.join(CALL_TIMEOUT + 30)
        assert not thread.is_alive(), "a soak client hung"
    samples.append(soak.sample())
    print(show(samples[-1]))

    wait_for_no_running_kv(server)
    cached = memory_status(server).sessions
    left = [s.session_id for s in cached if s.session_id.startswith("soak-")]
    tail = samples[len(samples) // 2:]
    minutes = [s.elapsed_s / 60 for s in tail]
    rss_mb = [s.rss_bytes / MB for s in tail]
    per_minute = slope(minutes, rss_mb)
    per_100 = slope([s.requests / 100 for s in tail], rss_mb)
    rows = [[f"{s.elapsed_s:.0f}", str(s.requests), f"{s.rss_bytes / MB:.1f}",
             f"{s.kv_bytes / MB:.2f}", str(s.running_requests), str(s.cached_sessions)]
            for s in samples]
    report("soak", f"soak: {soak.requests} requests in {samples[-1].elapsed_s:.0f} s, outcomes "
           f"{dict(soak.outcomes)}",
           ["t (s)", "requests", "RSS MB", "KV MB", "running", "sessions"], rows,
           {"samples": [asdict(s) for s in samples], "outcomes": dict(soak.outcomes),
            "rss_slope_mb_per_min": per_minute, "rss_slope_mb_per_100_requests": per_100},
           notes=[f"RSS slope over the last {len(tail)} samples: {per_minute:+.2f} MB/min, "
                  f"{per_100:+.2f} MB per 100 requests (bounds {RSS_SLOPE_MB_PER_MIN}, "
                  f"{RSS_SLOPE_MB_PER_100})"])

    assert soak.failures == [], soak.failures
    assert soak.outcomes["OK"] > 0
    assert left == [], f"ended sessions still cached: {left}"
    assert len(tail) >= 3, "too few samples to fit a slope: run longer or sample more often"
    assert per_minute < RSS_SLOPE_MB_PER_MIN, f"RSS grows {per_minute:.2f} MB/min"
    assert per_100 < RSS_SLOPE_MB_PER_100, f"RSS grows {per_100:.2f} MB per 100 requests"
