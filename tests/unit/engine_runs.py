"""Running an in-process engine on the tiny model: requests, outcomes, whole runs."""

from __future__ import annotations

import asyncio

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.types import ChatMessage, GenerationRequest, SamplingParams, TextPart


def request(name: str, tokens: int = 6, **sampling) -> GenerationRequest:
    """A text request named (and worded) `name` that generates exactly `tokens`."""
    params = {"max_new_tokens": tokens, "min_new_tokens": tokens, "seed": 1, **sampling}
    return GenerationRequest(name, [ChatMessage("user", [TextPart(name)])],
                             SamplingParams(**params))


async def outcome(engine: Engine, req: GenerationRequest):
    """The request's last event (Finished), or the error it ended with."""
    try:
        handle = await engine.submit(req)
        return [e async for e in handle.events()][-1]
    except Exception as error:
        return error


def run_all(model, requests, **config) -> tuple[list, Engine]:
    """Submit all requests at once to a fresh engine; their outcomes, and the engine."""
    engine = Engine(model, EngineConfig(**config))
    engine.start()

    async def main():
        return await asyncio.gather(*(outcome(engine, r) for r in requests))

    try:
        return asyncio.run(main()), engine
    finally:
        engine.stop()
