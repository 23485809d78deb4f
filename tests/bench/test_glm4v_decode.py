"""GLM-4.1V decodes agents side by side: aggregate decode tokens/s of four agents against
one, on the tiny real-shape GLM-4.1V, each agent's step carrying its own 1080x2400
screenshot (3,108 image tokens at the agent's max_pixels) and the agent's sampling.

Decode rate: tokens streamed per second while every agent of the round is decoding
(from the last first token to the first end), summed over the agents; for one agent,
its tokens after the first over the time after the first. Rounds alternate K=1, K=4.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from inference_svc.engine.compute_threads import torch_on_one_thread
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.types import (
    ChatMessage,
    Delta,
    GenerationRequest,
    ImagePart,
    SamplingParams,
    TextPart,
)
from tests.bench.harness import median, print_load, repeats, report
from tests.bench.phone_agent import AGENT_MAX_PIXELS
from tests.bench.phone_screens import screenshot_png
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

pytestmark = pytest.mark.bench
TOKENS = 128
PROMPT_PASS = 8192  # each agent's prompt prefilled in one pass, so decoding overlaps soon


def agent_step(name: str, seed: int, *, tokens: int = TOKENS) -> GenerationRequest:
    screen = ImagePart(screenshot_png(seed), "image/png", "messages[0].parts[0].image")
    return GenerationRequest(name, [ChatMessage("user", [
        screen, TextPart(f"Step 1 of agent {name}: tap the calendar.")])],
        SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0,
                       top_p=0.85, frequency_penalty=0.2, repetition_penalty=1.0,
                       logprobs=0))  # logprobs mark each token in the stream


async def token_times(engine: Engine, request: GenerationRequest) -> list[float]:
    """When each generated token reached the client."""
    handle = await engine.submit(request)
    times: list[float] = []
    async for event in handle.events():
        if isinstance(event, Delta):
            times += [time.perf_counter()] * len(event.logprobs)
    return times


def decode_rate(streams: list[list[float]]) -> float:
    if len(streams) == 1:
        times = streams[0]
        return (len(times) - 1) / (times[-1] - times[0])
    start, end = max(s[0] for s in streams), min(s[-1] for s in streams)
    tokens = sum(sum(1 for t in s if start < t <= end) for s in streams)
    return tokens / (end - start)


def test_four_agents_decode_side_by_side(tmp_path: Path):
    # as the server's threads: the model loop alone computes on every core (run this
    # module alone: a test before it that computed on several threads in this thread
    # leaves an OpenMP pool behind, which slows every parallel region of the loop)
    torch_on_one_thread()
    model = Glm4vModel(write_tiny_phone_glm4v_checkpoint(tmp_path / "phone-glm4v"))
    engine = Engine(model, EngineConfig(max_pixels=AGENT_MAX_PIXELS, prefix_caching=False,
                                         prefill_chunk_tokens=PROMPT_PASS))
    engine.start()
    seeds = iter(range(1000))

    def round_of(agents: int) -> float:
        requests = [agent_step(f"a{next(seeds)}", next(seeds)) for _ in range(agents)]

        async def main():
            return await asyncio.gather(*(token_times(engine, r) for r in requests))

        streams = asyncio.run(main())
        assert all(len(s) == TOKENS for s in streams)
        return decode_rate(streams)

    rates: dict[int, list[float]] = {1: [], 4: []}
    try:
        round_of(1)  # warm up
        print_load("glm4v_decode")
        for _ in range(repeats(3)):
            for agents in (1, 4):
                rates[agents].append(round_of(agents))
    finally:
        engine.stop()
    one, four = median(rates[1]), median(rates[4])
    report("glm4v_decode", f"tiny phone GLM-4.1V, {TOKENS} tokens per agent step, agent "
           "sampling, a 1080x2400 screenshot each (3,108 image tokens)",
           ["agents", "decode tok/s (sum)", "vs one agent"],
           [["1", f"{one:.1f}", "1.00"], ["4", f"{four:.1f}", f"{four / one:.2f}"]],
           {"rates": {str(k): v for k, v in rates.items()}})
