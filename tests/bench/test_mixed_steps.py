"""A long prompt prefilling beside decoding streams: one forward per step, or two.

Eight greedy streams decode on the embedded default (in-process engine, every core);
once each has tokens out, a ~7,000-token prompt arrives, and 50 ms later a short request.
Measured per round: the streams' inter-token gaps while the long prompt prefills (p50,
p99) against the same streams' gaps with no long prompt, the long prompt's prefill time,
and the short request's time to first token. Two engines on the same model alternate
rounds: `mixed_steps` on (prompt chunks and decode rows in one forward) and off (a
prefill pass, then a decode step: the weights read twice per step).

    .venv/bin/python -m pytest tests/bench/test_mixed_steps.py -m bench -s
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.types import ChatMessage, Delta, Finished, GenerationRequest, SamplingParams
from inference_svc.types import TextPart as Text
from tests.bench.harness import median, percentile, print_load, repeats, report, unique_tag

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]
STREAMS = 8
STREAM_TOKENS = 400
LONG_WORDS = 1200  # ~7,000 tokens


def request(request_id: str, text: str, tokens: int) -> GenerationRequest:
    return GenerationRequest(request_id, [ChatMessage("user", [Text(text)])],
                             SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens,
                                            temperature=0))


async def timed(engine: Engine, req: GenerationRequest) -> tuple[list[float], Finished]:
    """When each delta of the request arrived, and its final."""
    handle = await engine.submit(req)
    times: list[float] = []
    async for event in handle.events():
        if isinstance(event, Delta):
            times.append(time.perf_counter())
        elif isinstance(event, Finished):
            return times, event
    raise AssertionError(f"{req.request_id} ended without a final")


def gaps_between(times: list[list[float]], start: float, end: float) -> list[float]:
    return [b - a for stream in times for a, b in itertools.pairwise(stream)
            if start <= a and b <= end]


async def one_round(engine: Engine, *, with_long: bool) -> dict:
    tag = unique_tag()
    streams = [asyncio.create_task(timed(engine, request(
        f"s{i}", f"{tag} stream {i}: tell a long story about the sea", STREAM_TOKENS)))
        for i in range(STREAMS)]
    await asyncio.sleep(1.0)  # every stream admitted and decoding
    started = time.perf_counter()
    out: dict = {}
    if with_long:
        words = " ".join(f"item{i % 97} value{i % 89}" for i in range(LONG_WORDS))
        long = asyncio.create_task(timed(engine, request("long", f"{tag} {words}", 1)))
        await asyncio.sleep(0.05)
        short_sent = time.perf_counter()
        short_times, _ = await timed(engine, request("short", f"{tag} Say hi", 4))
        long_times, long_final = await long
        out["prefill_s"] = long_times[0] - started
        out["short_ttft_s"] = short_times[0] - short_sent
        out["long_prompt_tokens"] = long_final.usage.prompt_tokens
        window = (started, long_times[0])
    else:
        await asyncio.sleep(8.0)
        window = (started, time.perf_counter())
    results = await asyncio.gather(*streams)
    gaps = gaps_between([times for times, _ in results], *window)
    out["gap_p50_ms"] = 1000 * percentile(gaps, 50)
    out["gap_p99_ms"] = 1000 * percentile(gaps, 99)
    return out


def test_a_long_prefill_beside_eight_streams(default_bundle):
    from inference_svc.model.modular import ModularModel

    model = ModularModel(default_bundle)
    modes = {"one forward": True, "two passes": False}
    print_load("mixed_steps")
    rounds: dict[str, list[dict]] = {name: [] for name in modes}
    quiet: dict[str, list[dict]] = {name: [] for name in modes}
    for _ in range(repeats(2)):
        for name, mixed in modes.items():  # one model loop thread at a time
            engine = Engine(model, EngineConfig(max_batch=16, mixed_steps=mixed,
                                                kv_budget_bytes=1024**3))
            engine.start()
            try:
                quiet[name].append(asyncio.run(one_round(engine, with_long=False)))
                rounds[name].append(asyncio.run(one_round(engine, with_long=True)))
            finally:
                engine.stop()

    def med(name: str, key: str, source=rounds) -> float:
        return median([r[key] for r in source[name]])

    rows = []
    for name in modes:
        ratio = med(name, "gap_p99_ms") / med(name, "gap_p99_ms", quiet)
        rows.append([name, f"{med(name, 'gap_p50_ms', quiet):.1f}",
                     f"{med(name, 'gap_p99_ms', quiet):.1f}", f"{med(name, 'gap_p50_ms'):.1f}",
                     f"{med(name, 'gap_p99_ms'):.1f}", f"{ratio:.2f}",
                     f"{med(name, 'prefill_s'):.1f}", f"{med(name, 'short_ttft_s'):.2f}"])
    tokens = rounds["one forward"][0]["long_prompt_tokens"]
    report("mixed_steps",
           f"{STREAMS} greedy streams, a {tokens}-token prompt arriving (medians of "
           f"{len(rounds['one forward'])} alternating rounds)",
           ["steps", "gap p50 ms alone", "p99 alone", "p50 during prefill",
            "p99 during prefill", "p99 ratio", "prefill s", "short TTFT s"], rows,
           {"rounds": rounds, "quiet": quiet})
    for name in modes:
        assert med(name, "short_ttft_s") < med(name, "prefill_s")
