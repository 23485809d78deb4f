"""Benchmarks of autoglm-serve against transformers on the same model, in one run.

Run with `make bench`, or one of them with
`.venv/bin/python -m pytest tests/bench -m bench -s -k <name>`. The two sides of each
comparison live in one process tree and take turns (A B A B ...), because the machine is
small and shared; the tables give medians. BENCH_REPEATS sets the repetitions and
BENCH_OUT the folder for the JSON numbers.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import httpx
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import (
    Sampling,
    StreamResult,
    median,
    percentile,
    print_load,
    repeats,
    report,
    samples,
    unique_tag,
)
from tests.bench.prompts import AGENT_SYSTEM, screen_observation, single_turn
from tests.bench.streams import grpc_generate, openai_body, openai_generate
from tests.conftest import start_server

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]

SERVICE = "autoglm-serve (gRPC)"
IN_PROCESS = "in-process generate()"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def _rate(value: float) -> str:
    return f"{value:.1f}"


async def test_single_stream(service, in_process):
    """Tokens/s and time to first token of one stream: the service against in-process."""
    sampling = Sampling(max_new_tokens=128)
    rounds = repeats(5)
    ours: list[StreamResult] = []
    theirs: list[StreamResult] = []
    async with grpc.aio.insecure_channel(service.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        await grpc_generate(stub, single_turn(unique_tag()), Sampling(max_new_tokens=16))
        in_process.generate([single_turn(unique_tag())], Sampling(max_new_tokens=16))
        load = print_load("single_stream")
        for _ in range(rounds):
            messages = single_turn(unique_tag())
            ours.append(await grpc_generate(stub, messages, sampling))
            theirs.append(in_process.generate([messages], sampling)[0])

    assert all(r.completion_tokens > 0 for r in ours + theirs)
    assert [r.prompt_tokens for r in ours] == [r.prompt_tokens for r in theirs]

    def row(label: str, metric: Callable[[StreamResult], float], fmt) -> list[str]:
        a, b = median([metric(r) for r in ours]), median([metric(r) for r in theirs])
        return [label, fmt(a), fmt(b), f"{a / b:.2f}"]

    rows = [
        row("tokens/s, end to end", lambda r: r.tokens_per_s, _rate),
        row("tokens/s after first token", lambda r: r.decode_tokens_per_s, _rate),
        row("time to first token, ms", lambda r: r.ttft_s, _ms),
        row("completion tokens", lambda r: r.completion_tokens, lambda v: f"{v:.0f}"),
        row("prompt tokens", lambda r: r.prompt_tokens, lambda v: f"{v:.0f}"),
    ]
    report(
        "single_stream",
        f"single stream: {sampling.max_new_tokens} new tokens, median of {rounds} alternating "
        f"runs (temperature {sampling.temperature}, top_p {sampling.top_p}, "
        f"repetition_penalty {sampling.repetition_penalty})",
        ["metric (median)", SERVICE, IN_PROCESS, "service/in-process"], rows,
        {"load_average": load, "sampling": vars(sampling),
         "service": samples(ours), "in_process": samples(theirs)},
    )


# ---- concurrency -------------------------------------------------------------------

Runner = Callable[[list[list[dict[str, str]]]], Awaitable[list[StreamResult]]]


@pytest.mark.parametrize("sampling_name", ["greedy", "reference"])
async def test_concurrency(service, in_process, transformers_serve, transformers_serve_cb,
                           generation_defaults, sampling_name):
    """Aggregate tokens/s and TTFT at 1, 4, 8 and 16 concurrent streams, greedy and with
    the reference article's sampling."""
    sampling = Sampling.named(sampling_name, max_new_tokens=64)
    levels = [1, 4, 8, 16]
    rounds = repeats(2)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with (
        grpc.aio.insecure_channel(service.target) as channel,
        httpx.AsyncClient(base_url=transformers_serve.base_url, timeout=900,
                          limits=limits) as plain_client,
        httpx.AsyncClient(base_url=transformers_serve_cb.base_url, timeout=900,
                          limits=limits) as cb_client,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)

        async def via_service(conversations):
            return await asyncio.gather(*(grpc_generate(stub, c, sampling) for c in conversations))

        def via_openai(client: httpx.AsyncClient, model: str) -> Runner:
            async def run(conversations):
                bodies = [openai_body(model, c, sampling, generation_defaults)
                          for c in conversations]
                return await asyncio.gather(*(openai_generate(client, b) for b in bodies))
            return run

        async def via_batch(conversations):
            return in_process.generate(conversations, sampling)

        systems: dict[str, Runner] = {
            SERVICE: via_service,
            "transformers serve": via_openai(plain_client, transformers_serve.model),
            "transformers serve --continuous-batching":
                via_openai(cb_client, transformers_serve_cb.model),
            "in-process generate(), one padded batch": via_batch,
        }
        for run in systems.values():  # warm-up; also starts transformers' CB worker
            await run([single_turn(unique_tag()) for _ in range(2)])
        load = print_load("concurrency")
        walls: dict[tuple[str, int], list[float]] = {}
        results: dict[tuple[str, int], list[list[StreamResult]]] = {}
        for level in levels:
            for _ in range(rounds):
                conversations = [single_turn(unique_tag()) for _ in range(level)]
                for name, run in systems.items():
                    started = time.perf_counter()
                    streams = await run(conversations)
                    walls.setdefault((name, level), []).append(time.perf_counter() - started)
                    results.setdefault((name, level), []).append(streams)

    assert all(s.completion_tokens > 0 for runs in results.values() for r in runs for s in r)

    def aggregate(name: str, level: int) -> float:
        return median([sum(s.completion_tokens for s in streams) / wall for streams, wall
                       in zip(results[name, level], walls[name, level], strict=True)])

    rows = []
    for name in systems:
        for level in levels:
            ttfts = [s.ttft_s for streams in results[name, level] for s in streams]
            tokens = [s.completion_tokens for streams in results[name, level] for s in streams]
            rows.append([
                name, str(level), _rate(aggregate(name, level)),
                f"{aggregate(name, level) / aggregate(name, 1):.2f}",
                _ms(percentile(ttfts, 50)), _ms(percentile(ttfts, 99)),
                f"{min(tokens)}-{max(tokens)}",
            ])
    ours_8 = aggregate(SERVICE, 8)
    cb_8 = aggregate("transformers serve --continuous-batching", 8)
    notes = [
        f"{SERVICE}: 8 streams give {ours_8 / aggregate(SERVICE, 1):.2f}x the tokens/s of one "
        f"(issue asks >= 3x); {ours_8 / cb_8:.2f}x transformers serve --continuous-batching "
        f"at 8 streams (issue asks > 1x).",
        "transformers serve --continuous-batching drops repetition_penalty and min_new_tokens "
        "(its CB manager takes only max_new_tokens and eos per request): its rates count the "
        "tokens it actually produced.",
    ]
    report(
        f"concurrency_{sampling_name}",
        f"concurrency, {sampling_name} sampling: {sampling.max_new_tokens} new tokens per "
        f"stream, median of {rounds} alternating runs; TTFT percentiles over all streams of "
        "all runs",
        ["system", "streams", "aggregate tok/s", "vs 1 stream", "TTFT p50 ms",
         "TTFT p99 ms", "tokens/stream"],
        rows,
        {"load_average": load, "sampling": vars(sampling), "levels": levels,
         "runs": {f"{name}@{level}": {"wall_s": walls[name, level],
                                      "streams": [samples(r) for r in results[name, level]]}
                  for name, level in results}},
        notes,
    )


# ---- multi-turn --------------------------------------------------------------------

async def test_multi_turn_session_reuse(default_bundle, tmp_path):
    """TTFT of a ~2,000-token agent turn with the session's KV reused, and without."""
    target_tokens = 2000
    reply = Sampling(max_new_tokens=16)
    rounds = repeats(3)
    # Prefix caching off: only a session id can reuse KV, so the no-session arm recomputes.
    server = start_server(tmp_path / "server", None, "--no-prefix-caching", timeout=600)
    reused: list[StreamResult] = []
    fresh: list[StreamResult] = []
    turns: list[int] = []
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            await grpc_generate(stub, single_turn(unique_tag()), reply)
            load = print_load("multi_turn")
            for round_index in range(rounds):
                rng = random.Random(round_index)
                session = f"bench-{uuid.uuid4().hex}"
                history = [{"role": "system", "content": f"{unique_tag()} {AGENT_SYSTEM}"}]
                for step in range(1, 40):
                    history.append({"role": "user",
                                    "content": screen_observation(step, 9, rng)})
                    result = await grpc_generate(stub, history, reply, session_id=session)
                    if result.prompt_tokens >= target_tokens:
                        break
                    history.append({"role": "assistant", "content": result.text})
                reused.append(result)
                turns.append(step)
                fresh.append(await grpc_generate(stub, history, reply))
                await stub.EndSession(pb.EndSessionRequest(session_id=session))
    finally:
        server.terminate()

    assert all(r.completion_tokens > 0 for r in reused + fresh)
    assert all(r.cached_prompt_tokens > 0 for r in reused), "the session's KV was not reused"
    assert all(r.cached_prompt_tokens == 0 for r in fresh)

    def row(label: str, results: list[StreamResult]) -> list[str]:
        ttfts = [r.ttft_s for r in results]
        return [label, f"{median([r.prompt_tokens for r in results]):.0f}",
                f"{median([r.cached_prompt_tokens for r in results]):.0f}",
                _ms(median(ttfts)), _ms(min(ttfts)), _ms(max(ttfts))]

    ratio = median([r.ttft_s for r in reused]) / median([r.ttft_s for r in fresh])
    report(
        "multi_turn",
        f"multi-turn: TTFT of turn N (N = {min(turns)}-{max(turns)}, history >= {target_tokens} "
        f"tokens resent in full each turn), median of {rounds} alternating runs; server "
        f"--no-prefix-caching",
        ["arm", "prompt tokens", "cached tokens", "TTFT p50 ms", "min ms", "max ms"],
        [row("reuse: same session_id", reused), row("no reuse: no session_id", fresh)],
        {"load_average": load, "sampling": vars(reply), "turns": turns,
         "reuse": samples(reused), "no_reuse": samples(fresh), "ratio": ratio},
        [f"reuse / no reuse TTFT: {ratio:.0%} (issue asks <= 30%)"],
    )
