"""A long prompt being prefilled must not hold up anyone else.

Head of line: a ~7,000-token prompt is prefilled in chunks between decode steps; a short
request sent 50 ms after it gets its first token within a chunk's time, not after the
whole prefill (27 s on this machine when prefilled in one pass).

Deadline: the embedded default (SmolLM2-135M, CPU) gets a ~7,000-token prompt with a 0.3 s
deadline; 50 ms later a short request arrives. The long prefill stops at its next chunk
boundary (logged as prefill_stopped with how far past the deadline it stopped), and the
short request's time to first token is measured, five rounds, each against the default
chunk size and against one twice as large.

    .venv/bin/python -m pytest tests/bench/test_long_prefill.py -m bench -s
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from inference_svc.engine.engine import default_prefill_chunk
from tests.bench.harness import median, report
from tests.conftest import start_server

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
ROUNDS = 5
DEADLINE_S = 0.3


def request(text: str, tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])],
        sampling=pb.SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0))


def one_round(stub, server, long_text: str, tag: str) -> dict:
    short: dict[str, float] = {}

    def short_request() -> None:
        time.sleep(0.05)
        started = time.monotonic()
        for _ in stub.Generate(request("Say hi", 4), timeout=120):
            short.setdefault("ttft", time.monotonic() - started)

    worker = threading.Thread(target=short_request)
    worker.start()
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request(long_text, 4), timeout=DEADLINE_S,
                           metadata=[("x-request-id", tag)]))
    worker.join(120)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    stopped = wait_for_event(server, tag)
    return {"ttft_s": short["ttft"], **stopped}


def wait_for_event(server, tag: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log_lines():
            if line.get("request_id") == tag and line.get("event") == "prefill_stopped":
                return {"computed_tokens": line["computed_tokens"],
                        "past_deadline_s": line["past_deadline_s"]}
        time.sleep(0.05)
    return {"computed_tokens": None, "past_deadline_s": None}  # never started: deadline first


def test_a_prefill_past_its_deadline_stops_within_a_chunk(default_bundle, tmp_path):
    long_text = " ".join(f"item{i % 97} value{i % 89}" for i in range(1200))
    chunk = default_prefill_chunk("cpu")
    rows, data = [], {}
    for size in (chunk, 2 * chunk):
        server = start_server(tmp_path / f"chunk{size}", None,
                              "--prefill-chunk-tokens", str(size), timeout=600)
        try:
            with grpc.insecure_channel(server.target) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                list(stub.Generate(request("warm up", 2)))
                results = [one_round(stub, server, long_text, f"long-{size}-{n}")
                           for n in range(ROUNDS)]
        finally:
            server.terminate()
        data[str(size)] = results
        stopped = [r for r in results if r["computed_tokens"] is not None]
        rows.append([str(size), f"{median([r['ttft_s'] for r in results]):.2f}",
                     f"{max(r['ttft_s'] for r in results):.2f}",
                     f"{max((r['computed_tokens'] for r in stopped), default=0)}",
                     f"{max((r['past_deadline_s'] for r in stopped), default=0):.2f}"])
        assert all(r["computed_tokens"] is None or r["computed_tokens"] % size == 0
                   for r in results)  # stopped at a chunk boundary, never mid-prompt
    report("prefill_deadline", "~7,000-token prompt, 0.3 s deadline; short request 50 ms later",
           ["chunk", "short TTFT median s", "short TTFT max s", "long: tokens computed (max)",
            "stopped past deadline (max s)"], rows, {"rounds": data})


def test_a_long_prefill_delays_a_short_request_by_a_chunk_at_most(default_bundle, tmp_path):
    long_text = " ".join(f"item{i % 97} value{i % 89}" for i in range(1200))
    server = start_server(tmp_path / "hol", None, timeout=600)
    rows, data = [], []
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            list(stub.Generate(request("warm up", 2)))
            for n in range(3):
                long_done: dict[str, float] = {}
                sent = time.monotonic()

                def long_request(text: str, done: dict[str, float], since: float) -> None:
                    list(stub.Generate(request(text, 1), timeout=600))
                    done["s"] = time.monotonic() - since

                worker = threading.Thread(target=long_request,
                                          args=(f"{n} {long_text}", long_done, sent))
                worker.start()
                time.sleep(0.05)
                started = time.monotonic()
                ttft = None
                for _ in stub.Generate(request("Say hi", 4), timeout=600):
                    ttft = ttft or time.monotonic() - started
                worker.join(600)
                data.append({"short_ttft_s": ttft, "long_prefill_s": long_done["s"]})
                rows.append([str(n + 1), f"{ttft:.2f}", f"{long_done['s']:.1f}"])
                print(f"round {n + 1}: short TTFT {ttft:.2f} s, "
                      f"long prefill {long_done['s']:.1f} s", flush=True)
    finally:
        server.terminate()
    report("long_prefill_head_of_line",
           "~7,000-token prompt prefilling; short request sent 50 ms later (default chunk)",
           ["round", "short TTFT s", "long prompt's prefill s"], rows, {"rounds": data})
    assert all(d["short_ttft_s"] < d["long_prefill_s"] for d in data)
