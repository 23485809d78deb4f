"""The embedded default loaded as the service loads it in a chosen weight precision, and
greedy generations through the service's engine: what the precision benchmarks share."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from inference_svc.engine.compute_threads import TORCH_DEFAULT_THREADS, torch_on_one_thread
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.model.modular import ModularModel
from inference_svc.model.precision import resolve_precision
from inference_svc.types import (
    ChatMessage,
    Delta,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextPart,
)

# As in the server: the model loop computes on every core and the benchmark's own thread
# (loading, perplexity, the event loop) on one, so that libgomp's worker pools together
# fit the cores (engine/compute_threads.py); on 2 cores, with both threads on 2, the
# engine decoded at 16 tok/s instead of 25.
torch_on_one_thread()
COMPUTE_THREADS = TORCH_DEFAULT_THREADS
SPEED_TOKENS = 128
SPEED_PROMPT = "How do I boil an egg?"
# about 3,000 tokens, as a phone agent's step with its screenshot and history
LONG_PROMPT = " ".join(f"Item {i} is a fact about boiling eggs and the number {i * 7}."
                       for i in range(160))


def load(bundle: Path, name: str) -> ModularModel:
    """The embedded default with its decoder in `name` (a --decoder-weights value)."""
    precision = resolve_precision("--decoder-weights", name, torch.float32, ["cpu"])
    return ModularModel(bundle, decoder_weights=precision)


def greedy(tokens: int, index: int, text: str, *,
           repetition_penalty: float = SamplingParams.repetition_penalty) -> GenerationRequest:
    """Argmax decoding; with the service's default repetition penalty unless told."""
    return GenerationRequest(f"p{index}", [ChatMessage("user", [TextPart(text)])],
                             SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens,
                                            temperature=0, logprobs=0,
                                            repetition_penalty=repetition_penalty))


async def stream(engine: Engine, request: GenerationRequest) -> tuple[list[int], list[float]]:
    """The request's token ids and when each arrived."""
    handle = await engine.submit(request)
    ids: list[int] = []
    times: list[float] = []
    async for event in handle.events():
        if isinstance(event, Delta):
            now = time.perf_counter()
            ids += [t.token_id for t in event.logprobs]
            times += [now] * len(event.logprobs)
        elif isinstance(event, Finished):
            return ids, times
    raise AssertionError(f"{request.request_id} ended without a final")


@contextmanager
def started_engine(model: ModularModel, rows: int, *, host_compile: bool) -> Iterator[Engine]:
    """A fresh engine for `rows` streams (nothing cached), stopped after the block."""
    engine = Engine(model, EngineConfig(max_batch=rows, kv_budget_bytes=512 << 20,
                                        host_compile=host_compile))
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


def run_engine(model: ModularModel, requests: list[GenerationRequest], *,
               host_compile: bool = False) -> list[tuple[list[int], list[float]]]:
    with started_engine(model, len(requests), host_compile=host_compile) as engine:
        return asyncio.run(_gather(engine, requests))


async def _gather(engine: Engine, requests: list[GenerationRequest]):
    return await asyncio.gather(*(stream(engine, r) for r in requests))


def first_token_run(model: ModularModel, text: str, *,
                    host_compile: bool = False) -> float:
    """Seconds from submitting one greedy request for `text` to its first token, on a
    fresh engine (nothing of the prompt cached)."""
    with started_engine(model, 1, host_compile=host_compile) as engine:
        return asyncio.run(_first_token(engine, greedy(1, 0, text)))


async def _first_token(engine: Engine, request: GenerationRequest) -> float:
    submitted = time.perf_counter()
    _, times = await stream(engine, request)
    return times[0] - submitted


def decode_run(model: ModularModel, *, host_compile: bool = False,
               **greedy_args: float) -> tuple[list[int], float]:
    """One stream's greedy ids for SPEED_PROMPT and its tokens/s after the first token
    (with --host-compile: the first run compiles, later runs reuse its graphs)."""
    [(ids, times)] = run_engine(model, [greedy(SPEED_TOKENS, 0, SPEED_PROMPT, **greedy_args)],
                                host_compile=host_compile)
    return ids, (len(ids) - 1) / (times[-1] - times[0])
