"""Constrained decoding's cost: a batch of 8 where 4 rows follow a JSON Schema, against
the same batch unconstrained (aggregate tokens/s), and the time to compile a schema."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from inference_svc.engine.constraints import GrammarCompiler
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    ResponseFormat,
    SamplingParams,
    TextPart,
)

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
TOKENS = 48
ROWS = 8
# a string that cannot close within TOKENS: every constrained row generates all of them
LONG_STORY = json.dumps({"type": "object", "properties": {
    "title": {"type": "string"}, "story": {"type": "string", "minLength": 4000}},
    "required": ["title", "story"]})
TYPICAL = json.dumps({
    "type": "object",
    "properties": {
        "action": {"enum": ["tap", "swipe", "type", "back", "home", "finish"]},
        "x": {"type": "integer", "minimum": 0, "maximum": 1080},
        "y": {"type": "integer", "minimum": 0, "maximum": 2400},
        "text": {"type": "string", "maxLength": 200},
        "reason": {"type": "string"},
        "done": {"type": "boolean"},
    },
    "required": ["action", "reason", "done"],
    "additionalProperties": False,
})


def batch(constrained: int) -> list[GenerationRequest]:
    fmt = ResponseFormat("json_schema", schema=LONG_STORY)
    return [GenerationRequest(
        f"r{i}", [ChatMessage("user", [TextPart(f"Tell story number {i}.")])],
        SamplingParams(max_new_tokens=TOKENS, min_new_tokens=TOKENS, temperature=0.8, seed=i,
                       response_format=fmt if i < constrained else None))
        for i in range(ROWS)]


def tokens_per_second(engine: Engine, requests: list[GenerationRequest]) -> float:
    async def one(request: GenerationRequest) -> Finished:
        handle = await engine.submit(request)
        return [e async for e in handle.events()][-1]

    async def main() -> list[Finished]:
        return await asyncio.gather(*(one(r) for r in requests))

    started = time.perf_counter()
    finished = asyncio.run(main())
    seconds = time.perf_counter() - started
    assert all(f.usage.completion_tokens == TOKENS for f in finished)
    return sum(f.usage.completion_tokens for f in finished) / seconds


def test_four_constrained_rows_in_a_batch_of_eight(default_bundle):
    from inference_svc.model.modular import ModularModel

    model = ModularModel(default_bundle)
    engine = Engine(model, EngineConfig(max_batch=ROWS))
    engine.start()
    try:
        engine.grammars.compile(ResponseFormat("json_schema", schema=LONG_STORY))  # warm
        tokens_per_second(engine, batch(0))  # warm-up
        free = max(tokens_per_second(engine, batch(0)) for _ in range(3))
        mixed = max(tokens_per_second(engine, batch(ROWS // 2)) for _ in range(3))
    finally:
        engine.stop()

    compiler = GrammarCompiler(model.tokenizer, vocab_size=model.config.vocab_size,
                               eos_ids=model.eos_token_ids)
    started = time.perf_counter()
    compiler._llg_tokenizer()
    vocabulary = time.perf_counter() - started
    compiled = compiler.compile(ResponseFormat("json_schema", schema=TYPICAL))
    started = time.perf_counter()
    compiler.compile(ResponseFormat("json_schema", schema=TYPICAL))
    cached = time.perf_counter() - started
    print(f"\nbatch of {ROWS}, {TOKENS} tokens each: unconstrained {free:.1f} tok/s, "
          f"{ROWS // 2} rows constrained {mixed:.1f} tok/s, ratio {mixed / free:.3f}\n"
          f"typical schema: compiled in {compiled.compile_seconds * 1000:.2f} ms, cached "
          f"lookup {cached * 1e6:.1f} us; vocabulary table (once per model) "
          f"{vocabulary * 1000:.0f} ms")
    # a grammar's mask is applied per constrained row on the batch's logits: half the rows
    # constrained must not cost the batch half its throughput
    assert mixed / free > 0.5
