"""Containment in the model loop: a failure ends only the request it belongs to."""

from __future__ import annotations

import asyncio

import pytest
import torch

from inference_svc.engine.batch import DecodeBatch, NonFiniteScores, Sampler, choose_tokens
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.engine.model_loop import ModelLoop
from inference_svc.engine.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextPart,
)
from inference_svc.errors import GenerationFailed
from inference_svc.model.modular import ModularModel


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ModularModel(tiny_bundle)


def request(name: str, tokens: int = 6, **sampling) -> GenerationRequest:
    params = {"max_new_tokens": tokens, "min_new_tokens": tokens, "seed": 1, **sampling}
    return GenerationRequest(name, [ChatMessage("user", [TextPart(name)])],
                             SamplingParams(**params))


async def outcome(engine: Engine, req: GenerationRequest):
    try:
        handle = await engine.submit(req)
        return [e async for e in handle.events()][-1]
    except Exception as error:
        return error


def run_all(model, requests, **config):
    engine = Engine(model, EngineConfig(**config))
    engine.start()

    async def main():
        return await asyncio.gather(*(outcome(engine, r) for r in requests))

    try:
        return asyncio.run(main()), engine
    finally:
        engine.stop()


def test_a_row_with_non_finite_scores_fails_alone(model, monkeypatch):
    step = DecodeBatch.step

    def poisoned(self, decoder):
        logits = step(self, decoder).clone()
        for index, row in enumerate(self.rows):
            if row.key.startswith("NAN"):
                logits[index] = float("nan")
        return logits

    monkeypatch.setattr(DecodeBatch, "step", poisoned)
    names = ["ok one", "NAN row", "ok two", "ok three"]
    results, _ = run_all(model, [request(n, tokens=8) for n in names])
    by_name = dict(zip(names, results, strict=True))
    assert isinstance(by_name["NAN row"], GenerationFailed)
    for name in ("ok one", "ok two", "ok three"):
        assert isinstance(by_name[name], Finished)
        assert by_name[name].usage.completion_tokens == 8


def test_an_error_in_shared_work_fails_those_in_flight_and_the_loop_goes_on(model,
                                                                            monkeypatch):
    step = ModelLoop._step
    calls = {"n": 0}

    def failing_once(self, batch, sequences):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated bug in shared work")
        return step(self, batch, sequences)

    monkeypatch.setattr(ModelLoop, "_step", failing_once)
    engine = Engine(model, EngineConfig())
    engine.start()

    async def main():
        first = await outcome(engine, request("first", tokens=6))
        second = await outcome(engine, request("second", tokens=6))
        return first, second

    try:
        first, second = asyncio.run(main())
        assert engine.fault(stall_timeout_s=60) is None
        assert engine.running() == []
    finally:
        engine.stop()
    assert isinstance(first, GenerationFailed)
    assert isinstance(second, Finished) and second.usage.completion_tokens == 6


def test_a_cache_holding_non_finite_values_is_never_kept_for_reuse(model, monkeypatch):
    prefill = model.prefill

    def poisoning(plan, media, cache, **options):
        logits = prefill(plan, media, cache, **options)
        if "POISON" in model.tokenizer.decode(plan.input_ids):
            with torch.inference_mode():
                cache.layers[0].keys[..., -1, :] = float("inf")
        return logits

    monkeypatch.setattr(model, "prefill", poisoning)
    prompt = "POISON " + "shared prefix words " * 8
    results, engine = run_all(model, [request(prompt, tokens=1)])
    assert isinstance(results[0], GenerationFailed)
    assert engine.sessions.entries() == []


def test_a_request_past_its_deadline_is_never_prefilled(model, monkeypatch):
    prefills = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda *a, **k: prefills.append(1) or prefill(*a, **k))
    monkeypatch.setattr(model, "prefill_batch", None)
    late = GenerationRequest("late", [ChatMessage("user", [TextPart("late")])],
                             SamplingParams(max_new_tokens=4), deadline=0.0)
    results, engine = run_all(model, [late])
    assert isinstance(results[0], Finished)
    assert results[0].reason.value == "cancelled"
    assert results[0].usage.completion_tokens == 0
    assert prefills == [] or engine.completed == 1


def test_chunked_prefill_matches_one_pass_and_stops_between_chunks(model):
    from transformers import DynamicCache

    from inference_svc.engine.engine import validate  # noqa: F401  (engine import order)

    plan = model.plan([ChatMessage("user", [TextPart("one two three four " * 20)])],
                      model.decode_media([], max_pixels=1 << 20), enable_thinking=False)
    media = model.decode_media([], max_pixels=1 << 20)
    whole = model.prefill(plan, media, DynamicCache())
    chunked = model.prefill(plan, media, DynamicCache(), chunk_tokens=16)
    assert torch.allclose(whole, chunked, atol=1e-4)
    asked = []
    cache = DynamicCache()
    stopped = model.prefill(plan, media, cache, chunk_tokens=16,
                            should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert stopped is None
    assert cache.get_seq_length() == 32  # two chunks ran, the third never started


def test_choose_tokens_isolates_rows_that_cannot_be_sampled():
    vocab = 50
    logits = torch.randn(3, vocab)
    logits[1, 7] = float("nan")
    samplers = [Sampler.create(SamplingParams(temperature=0.8, top_p=0.9), prompt_length=1,
                               eos_ids=[0], seed=i) for i in range(3)]
    histories = [torch.tensor([[5]]) for _ in range(3)]
    choices = choose_tokens(samplers, histories, logits)
    assert isinstance(choices[1], NonFiniteScores)
    assert all(isinstance(c, int) for c in (choices[0], choices[2]))
