"""Containment in the model loop: a failure ends only the request it belongs to."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import torch

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.engine.model_loop import ModelLoop
from inference_svc.engine.runner import ModelRunner
from inference_svc.engine.sampling import NonFiniteScores, Sampler, choose_tokens
from inference_svc.errors import GenerationFailed
from inference_svc.types import (
    ChatMessage,
    Delta,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextPart,
)
from tests.unit.engine_runs import outcome, request, run_all


def test_a_row_with_non_finite_scores_fails_alone(model, monkeypatch):
    decode = ModelRunner._decode_pass

    def poisoned(self, plan):
        logits = decode(self, plan).clone()
        for index, sequence in enumerate(plan.rows):
            if sequence.key.startswith("NAN"):
                logits[index] = float("nan")
        return logits

    monkeypatch.setattr(ModelRunner, "_decode_pass", poisoned)
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

    def failing_once(self, plan):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated bug in shared work")
        return step(self, plan)

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
    forward = ModelRunner._forward
    poisoned = {"done": False}

    def poisoning(self, chunks, rows=(), row_slots=()):
        logits = forward(self, chunks, rows, row_slots)
        if not poisoned["done"]:  # the first prompt's KV gets an infinity, its logits not
            poisoned["done"] = True
            slot = chunks[0].slots.write[-1]
            with torch.inference_mode():
                self.pool.keys[0][:, slot] = float("inf")
        return logits

    monkeypatch.setattr(ModelRunner, "_forward", poisoning)
    prompt = "POISON " + "shared prefix words " * 8
    results, engine = run_all(model, [replace(request(prompt, tokens=1), session_id="s")])
    assert poisoned["done"]
    assert isinstance(results[0], GenerationFailed)
    assert engine.sessions.entries() == []
    assert engine.kv_account().held_blocks == 0


def test_a_request_past_its_deadline_is_never_prefilled(model, monkeypatch):
    chunks = []
    forward = model.forward_paged
    monkeypatch.setattr(model, "forward_paged",
                        lambda *a, **k: chunks.append(1) or forward(*a, **k))
    late = GenerationRequest("late", [ChatMessage("user", [TextPart("late")])],
                             SamplingParams(max_new_tokens=4), deadline=0.0)
    results, _ = run_all(model, [late])
    assert isinstance(results[0], Finished)
    assert results[0].reason.value == "cancelled"
    assert results[0].usage.completion_tokens == 0
    assert chunks == []


def test_a_long_prefill_yields_to_decoding_and_stops_between_chunks(model, monkeypatch):
    """With 16-position chunks, a long prompt is fed between decode steps: a short request
    that arrives while it is prefilling is done first; cancelled mid-prefill, a prompt's
    work stops at a chunk."""
    forward = model.forward_paged

    def slow_forward(pool, rows, inputs, positions=None):
        time.sleep(0.005)  # the tiny model is too fast to be overtaken otherwise
        return forward(pool, rows, inputs, positions)

    monkeypatch.setattr(model, "forward_paged", slow_forward)
    engine = Engine(model, EngineConfig(prefill_chunk_tokens=16))
    engine.start()
    long_prompt = "one two three four five six " * 60
    order: list[str] = []

    async def follow(name: str, handle):
        async for event in handle.events():
            order.append(f"{name}:{type(event).__name__}")
        return event

    async def prefilling(req: GenerationRequest):
        handle = await engine.submit(req)
        while not engine._loop.scheduler.batch.prefilling:  # it is fed chunk by chunk now
            await asyncio.sleep(0.001)
        return handle

    async def main():  # each stream is read as its events arrive
        long = asyncio.create_task(follow("long", await prefilling(request(long_prompt, 2))))
        short = asyncio.create_task(follow("short", await engine.submit(request("hi", 3))))
        return await long, await short

    async def cancelled():
        handle = await prefilling(request(long_prompt.upper(), tokens=2))  # nothing cached
        handle.cancel()
        return [e async for e in handle.events()][-1]

    try:
        long, short = asyncio.run(main())
        stopped = asyncio.run(cancelled())
        assert engine.fault(stall_timeout_s=60) is None
    finally:
        engine.stop()
    assert long.usage.completion_tokens == 2 and short.usage.completion_tokens == 3
    assert order.index("short:Finished") < order.index("long:Delta")
    assert stopped.reason.value == "cancelled" and stopped.usage.completion_tokens == 0


def _paged_prefill(model, embeds, length: int, chunk: int, first_block: int = 1):
    """Feed `embeds` into a fresh pool in chunks; the logits after the last position."""
    from inference_svc.model.paged.kv_pool import RowSlots

    size = 16
    pool = model.new_kv_pool(block_size=size, blocks=first_block + length // size + 1)

    def slots(a: int, b: int) -> torch.Tensor:
        return torch.tensor([(first_block + p // size) * size + p % size for p in range(a, b)])

    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        logits = model.forward_paged(pool, [RowSlots(slots(start, end), slots(0, end))],
                                     [embeds[0, start:end]])
    return logits[0]


def test_chunked_prefill_matches_one_pass(model):
    media = model.decode_media([], max_pixels=1 << 20)
    plan = model.plan([ChatMessage("user", [TextPart("one two three four " * 20)])], media,
                      enable_thinking=False)
    embeds = model.prompt_inputs(plan, media).embeds[None]
    length = len(plan.input_ids)
    whole = _paged_prefill(model, embeds, length, chunk=length)
    chunked = _paged_prefill(model, embeds, length, chunk=16, first_block=3)
    assert torch.allclose(whole, chunked, atol=1e-4)
    with model.decoder_unit.use() as decoder, torch.inference_mode():
        dense = decoder(inputs_embeds=embeds).logits[0, -1]
    assert torch.allclose(whole, dense, atol=1e-4)


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


def test_a_finished_request_is_freed_without_waiting_for_the_garbage_collector(model):
    """No reference cycle keeps a finished request (and its decoded media) alive: with the
    collector off, dropping the last outside reference frees it."""
    import gc
    import weakref

    req = request("free me", tokens=4)
    alive = weakref.ref(req)
    gc.collect()
    gc.disable()
    try:
        results, _ = run_all(model, [req])
        del req, results
        assert alive() is None
    finally:
        gc.enable()


def test_a_failed_mixed_pass_is_run_again_as_its_parts_and_loses_nothing(model, monkeypatch):
    """When the forward of prompt chunks and decode rows together fails, the prompts'
    pass and the decode step run apart, so each request still says what it says alone."""
    def texts(**config) -> list[str]:
        engine = Engine(model, EngineConfig(prefill_chunk_tokens=16, **config))
        engine.start()

        async def text_of(handle) -> str:
            return "".join([e.text async for e in handle.events() if isinstance(e, Delta)])

        async def main():  # the short one decodes while the long one is still prefilling
            long = await engine.submit(request("a long prompt " * 120, tokens=4,
                                               temperature=0))
            while not engine._loop.scheduler.batch.prefilling:
                await asyncio.sleep(0.001)
            short = await engine.submit(request("a short one", tokens=24, temperature=0))
            return await asyncio.gather(text_of(long), text_of(short))

        try:
            return asyncio.run(main())
        finally:
            engine.stop()

    expected = texts(mixed_steps=False)
    forward, failed = ModelRunner._forward, []

    def failing_when_mixed(self, chunks, rows=(), row_slots=()):
        if rows:
            failed.append(len(rows))
            raise RuntimeError("simulated failure of a mixed pass")
        return forward(self, chunks, rows, row_slots)

    monkeypatch.setattr(ModelRunner, "_forward", failing_when_mixed)
    assert texts() == expected
    assert failed  # the mixed pass was tried, failed, and its parts ran apart
