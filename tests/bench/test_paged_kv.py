"""Paged KV on the embedded default (CPU): no padding, shared prefixes, preemption.

Each case starts the real server and reads the control API's memory account while
requests run; numbers are printed (and written to BENCH_OUT), with a few assertions on
what the issue asks for. Run one with

    .venv/bin/python -m pytest tests/bench/test_paged_kv.py -m bench -s -k <name>
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cgrpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import report
from tests.conftest import start_server

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
MB = 1024 * 1024


def bytes_per_token(bundle: Path) -> int:
    """KV bytes of one token of the embedded decoder (float32)."""
    config = json.loads((bundle / "decoder" / "config.json").read_text())
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * heads * head_dim * 4


def words(n: int, seed: int = 0) -> str:
    return " ".join(f"w{(i * 7 + seed) % 113} v{(i + seed) % 89}" for i in range(n))


def greedy(messages: list[pb.Message], tokens: int, **fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(messages=messages, sampling=pb.SamplingParams(
        max_new_tokens=tokens, min_new_tokens=tokens, temperature=0), **fields)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text=text)])


def status(control) -> cpb.MemoryStatus:
    return control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status


def stubs(server):
    public = grpc.insecure_channel(server.target)
    private = grpc.insecure_channel(server.control_target)
    return public, private, pb_grpc.InferenceServiceStub(public), cgrpc.ControlServiceStub(private)


class Watcher:
    """Reads the memory account every 50 ms on a thread, keeping what `keep` selects."""

    def __init__(self, control, keep) -> None:
        self.samples: list[cpb.MemoryStatus] = []
        self._control, self._keep = control, keep
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch)

    def _watch(self) -> None:
        while not self._done.is_set():
            account = status(self._control)
            if self._keep(account, self.samples):
                self.samples.append(account)
            time.sleep(0.05)

    def __enter__(self) -> Watcher:
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._done.set()
        self._thread.join()


def run_all(stub, requests: list[pb.GenerateRequest]) -> list[list[pb.GenerateResponse]]:
    results: list = [None] * len(requests)

    def one(i: int) -> None:
        results[i] = list(stub.Generate(requests[i], timeout=1200))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_a_long_prompt_decoding_beside_short_ones_pads_nothing(default_bundle, tmp_path):
    """One ~4,000-token prompt decoding beside seven ~100-token prompts: the KV in the
    account against live tokens x bytes per token (+ one block per sequence)."""
    per_token = bytes_per_token(default_bundle)
    server = start_server(tmp_path / "s", None, "--no-prefix-caching", timeout=600)
    try:
        public, private, stub, control = stubs(server)
        with public, private:
            requests = [greedy([user(words(680))], 48)]  # ~4,000 tokens
            requests += [greedy([user(words(17, seed=i))], 48) for i in range(1, 8)]  # ~100
            with Watcher(control, lambda s, _: s.running_requests == len(s.requests) == 8) as w:
                results = run_all(stub, requests)
            samples = w.samples
    finally:
        server.terminate()
    assert all(r[-1].final.usage.completion_tokens == 48 for r in results)
    assert samples, "the eight never ran side by side"
    worst = max(samples, key=lambda s: s.kv_bytes - sum(r.tokens for r in s.requests) * per_token)
    live = sum(r.tokens for r in worst.requests)
    bound = live * per_token + 8 * worst.kv_block_tokens * per_token
    prompts = [r[-1].final.usage.prompt_tokens for r in results]
    report("paged_no_padding", "A long prompt beside short ones (embedded default, CPU)",
           ["prompts (tokens)", "live tokens", "KV in the account", "live x bytes/token",
            "bound (+1 block each)", "a left-padded batch would hold"],
           [[f"{prompts[0]} + 7 x ~{sum(prompts[1:]) // 7}", str(live),
             f"{worst.kv_bytes / MB:.1f} MB", f"{live * per_token / MB:.1f} MB",
             f"{bound / MB:.1f} MB",
             f"{8 * max(r.tokens for r in worst.requests) * per_token / MB:.1f} MB"]],
           {"samples": len(samples), "kv_bytes": worst.kv_bytes, "live_tokens": live,
            "bytes_per_token": per_token, "bound": bound})
    assert worst.kv_bytes <= bound


def test_sessions_sharing_a_system_prompt_hold_it_once(default_bundle, tmp_path):
    """32 sessions whose conversations start with the same ~700-token system prompt: the
    account while they all run (shared bytes), and a later turn's time to first token
    with ~2,000 tokens of history against a cold prefill of the same conversation."""
    per_token = bytes_per_token(default_bundle)
    system = pb.Message(role=pb.ROLE_SYSTEM, parts=[pb.Part(text=words(120))])  # ~700
    server = start_server(tmp_path / "s", None, timeout=600)
    try:
        public, private, stub, control = stubs(server)
        with public, private:
            first = list(stub.Generate(greedy([system, user("first question")], 8,
                                              session_id="s0")))
            prompt = first[-1].final.usage.prompt_tokens
            requests = [greedy([system, user(f"question number {i}")], 24,
                               session_id=f"s{i}") for i in range(1, 33)]
            with Watcher(control, lambda s, seen: not seen or s.running_requests
                         > seen[-1].running_requests) as w:
                results = run_all(stub, requests)
            peak = w.samples[-1]
            cached = [r[-1].final.usage.cached_prompt_tokens for r in results]

            history = [system, user(words(230, seed=5))]  # ~2,000 tokens with the system
            turn = greedy(history, 16, session_id="long")
            cold_ttft, reply = first_token_and_reply(stub, turn)
            history += [pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text=reply)]),
                        user("and then?")]
            warm_ttft, _ = first_token_and_reply(stub, greedy(history, 16, session_id="long"))
            control.TrimKvCache(cpb.TrimKvCacheRequest(policy=cpb.TRIM_POLICY_ALL_IDLE))
            cold_again, _ = first_token_and_reply(stub, greedy(history, 16))
    finally:
        server.terminate()
    private_copies = 32 * prompt * per_token
    report("paged_sharing", "32 sessions over one ~700-token system prompt (CPU)",
           ["prompt tokens", "running at peak", "KV in use", "shared KV",
            "32 private copies would hold", "cached prompt tokens (min)",
            "turn-2 TTFT / cold TTFT"],
           [[str(prompt), str(peak.running_requests), f"{peak.kv_bytes / MB:.1f} MB",
             f"{peak.shared_kv_bytes / MB:.1f} MB", f"{private_copies / MB:.1f} MB",
             str(min(cached)),
             f"{warm_ttft:.3f} s / {cold_again:.3f} s = {warm_ttft / cold_again:.0%}"]],
           {"peak": {"running": peak.running_requests, "kv_bytes": peak.kv_bytes,
                     "shared": peak.shared_kv_bytes}, "cached": cached,
            "cold_first_turn_ttft": cold_ttft, "warm_ttft": warm_ttft,
            "cold_ttft": cold_again})
    assert min(cached) >= prompt - 32
    assert peak.shared_kv_bytes > 0
    assert peak.kv_bytes < private_copies / 4


def first_token_and_reply(stub, request: pb.GenerateRequest) -> tuple[float, str]:
    started = time.monotonic()
    first, text = None, ""
    for response in stub.Generate(request, timeout=600):
        if response.text_delta and first is None:
            first = time.monotonic() - started
        text += response.text_delta
    return first, text


def test_preemption_through_a_budget_for_four(default_bundle, tmp_path):
    """32 greedy requests of 512 tokens through a KV budget that holds about four of them
    at full length: all complete with the output of a run with room for all."""
    per_token = bytes_per_token(default_bundle)
    requests = [greedy([user(f"Request {i}: " + words(20, seed=i))], 512) for i in range(32)]
    results = {}
    counts = {}
    for name, budget_mb in (("roomy", 2048), ("tight", None)):
        if budget_mb is None:
            budget_mb = 4 * (results["roomy"][0][-1].final.usage.prompt_tokens + 512) \
                * per_token / MB
        server = start_server(tmp_path / name, None, "--kv-budget-mb", f"{budget_mb:.2f}",
                              "--max-batch", "32", "--queue-timeout", "3600", timeout=600)
        try:
            public, private, stub, _ = stubs(server)
            with public, private:
                started = time.monotonic()
                results[name] = run_all(stub, requests)
                elapsed = time.monotonic() - started
            lines = server.log_lines()
        finally:
            server.terminate()
        preempted = [e for e in lines if e.get("event") == "preempted"]
        counts[name] = {"budget_mb": budget_mb, "seconds": elapsed,
                        "preemptions": len(preempted),
                        "swaps": sum(1 for e in preempted if not e.get("recompute")),
                        "recomputes": sum(1 for e in preempted if e.get("recompute"))}

    def texts(name: str) -> list[str]:
        return ["".join(r.text_delta for r in result) for result in results[name]]

    same = sum(a == b for a, b in zip(texts("roomy"), texts("tight"), strict=True))
    report("paged_preemption", "32 x 512 greedy tokens through a budget for ~4 (CPU)",
           ["run", "KV budget", "seconds", "preemptions", "swapped", "recomputed",
            "outputs equal to the roomy run"],
           [[name, f"{c['budget_mb']:.1f} MB", f"{c['seconds']:.0f}", str(c["preemptions"]),
             str(c["swaps"]), str(c["recomputes"]),
             "-" if name == "roomy" else f"{same}/32"] for name, c in counts.items()],
           counts)
    assert all(r[-1].final.usage.completion_tokens == 512 for r in results["tight"])
    assert same == 32
    assert counts["tight"]["preemptions"] > 0
