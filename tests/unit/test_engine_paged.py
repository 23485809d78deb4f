"""The engine on paged KV: no padding, shared prefixes, preemption that loses nothing."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
import torch

from inference_svc.engine.engine import Admission, Engine, EngineConfig
from inference_svc.engine.model_loop import ModelLoop
from inference_svc.errors import InvalidRequest
from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.types import (
    ChatMessage,
    ChoiceEnd,
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextPart,
)

BLOCK = 16


def greedy(name: str, text: str, tokens: int, **fields) -> GenerationRequest:
    sampling = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0,
                              repetition_penalty=1.0)
    return GenerationRequest(name, [ChatMessage("user", [TextPart(text)])], sampling, **fields)


def run(engine: Engine, requests: list[GenerationRequest]) -> list[tuple[str, Finished]]:
    """Every request's streamed text and final event. All are queued before any is
    admitted (admission is paused meanwhile), so the schedule does not depend on how
    fast each prompt is prepared."""
    async def read(handle) -> tuple[str, Finished]:
        text, final = "", None
        async for event in handle.events():
            if isinstance(event, Delta):
                text += event.text
            else:
                final = event
        return text, final

    async def main():
        engine.set_admission(Admission(mode="paused"))
        handles = [await engine.submit(r) for r in requests]
        engine.set_admission(Admission())
        return await asyncio.gather(*(read(h) for h in handles))

    return asyncio.run(main())


def started(model, **config) -> Engine:
    engine = Engine(model, EngineConfig(kv_block_tokens=BLOCK, **config))
    engine.start()
    return engine


def test_a_long_prompt_beside_short_ones_holds_its_tokens_and_no_padding(model, monkeypatch):
    """At every decode step the KV held is at most the live tokens plus one partly filled
    block per sequence: the long prompt does not widen the short ones' rows."""
    seen: list[tuple[int, int, int]] = []
    step = ModelLoop._step

    def observed(self, plan):
        step(self, plan)
        held = self.ledger.account().held_blocks
        # a decoding sequence may hold the block its next token goes to; a prefilling
        # prompt holds its own blocks from admission on
        batch = self.scheduler.batch
        bound = sum(s.length // BLOCK + 1 for s in batch.decoding.values())
        bound += sum(-(-len(p.plan.input_ids) // BLOCK) for p in batch.prefilling)
        seen.append((held, bound, len(batch.decoding)))

    monkeypatch.setattr(ModelLoop, "_step", observed)
    engine = started(model, prefix_caching=False, prefill_chunk_tokens=512)
    try:
        long = greedy("long", "alpha beta gamma delta " * 60, 12)
        shorts = [greedy(f"short {i}", f"hello number {i}", 12) for i in range(7)]
        results = run(engine, [long, *shorts])
    finally:
        engine.stop()
    assert all(final.usage.completion_tokens == 12 for _, final in results)
    assert any(count == 8 for _, _, count in seen)  # they did decode side by side
    for held, bound, _ in seen:
        assert held <= bound


def test_sessions_sharing_a_system_prompt_hold_its_blocks_once(model):
    system = "You are a careful assistant for a phone agent. " * 12
    first = replace(greedy("s0", "first", 4), session_id="s0")
    first = replace(first, messages=[ChatMessage("system", [TextPart(system)]),
                                     *first.messages])
    others = [replace(first, request_id=f"s{i}", session_id=f"s{i}",
                      messages=[first.messages[0],
                                ChatMessage("user", [TextPart(f"question {i}")])])
              for i in range(1, 9)]
    engine = started(model)
    try:
        [(_, cold)] = run(engine, [first])
        results = run(engine, others)
        account = engine.kv_account()
    finally:
        engine.stop()
    shared_prompt = cold.usage.prompt_tokens - 8  # the system prompt and a little more
    for _, final in results:
        assert final.usage.cached_prompt_tokens >= shared_prompt - BLOCK
    # nine sessions hold their common prefix in one set of blocks
    assert account.shared_blocks >= shared_prompt // BLOCK - 1
    assert account.held_blocks < 9 * (cold.usage.prompt_tokens // BLOCK)


@dataclass
class PreemptionRuns:
    expected: list[tuple[str, Finished]]  # with room for every request
    got: list[tuple[str, Finished]]  # through a budget for about two
    tight: Engine  # the stopped engine of the tight run


def room_for_two(expected) -> int:
    """Blocks for about two of the requests at full length (48 tokens each)."""
    longest = max(final.usage.prompt_tokens for _, final in expected) + 48
    return 2 * -(-longest // BLOCK) + 2


def preemption_runs(model, chunk: int, *, budget_blocks=None, requests=None, reader=None,
                    **config) -> PreemptionRuns:
    """Greedy requests of 48 tokens (by default six), with room for all, then through a
    KV budget that fits about two of them at full length (or `budget_blocks(expected)`
    blocks); `reader` (default `run`) submits them and reads what they say."""
    requests = requests or [
        greedy(f"r{i}", f"Tell me about topic {i} " + "and more " * (i * 6), 48)
        for i in range(6)]
    reader = reader or run
    large = started(model)
    try:
        expected = reader(large, requests)
        per_block = large.ledger.bytes_per_block
    finally:
        large.stop()
    budget = (budget_blocks or room_for_two)(expected)
    tight = started(model, kv_budget_bytes=budget * per_block, prefill_chunk_tokens=chunk,
                    **config)
    try:
        got = reader(tight, requests)
    finally:
        tight.stop()
    return PreemptionRuns(expected, got, tight)


@pytest.mark.parametrize("chunk", [8, 4096], ids=["long-ones-swap", "all-recompute"])
def test_preempted_sequences_finish_with_the_output_of_an_unpreempted_run(model, chunk):
    """Everyone completes, by swapping to host memory and back (sequences longer than a
    prefill chunk) or by recomputation, and greedy output is the same as with a budget
    that fits them all."""
    runs = preemption_runs(model, chunk)
    assert [text for text, _ in runs.got] == [text for text, _ in runs.expected]
    assert all(final.usage.completion_tokens == 48 for _, final in runs.got)
    assert runs.tight.preemptions > 0
    assert (runs.tight.swaps > 0) if chunk == 8 else (runs.tight.swaps == 0)
    account = runs.tight.kv_account()
    assert account.held_blocks == 0 and account.swapped_bytes == 0


def test_a_preempted_request_never_times_out_in_the_queue(model):
    """Every prompt fits at admission, then they outgrow the budget together: requests
    preempted (while decoding or still prefilling) wait as long as it takes, although
    a fresh request would time out at once."""
    def all_prompts_and_a_little(expected) -> int:
        return sum(-(-final.usage.prompt_tokens // BLOCK) for _, final in expected) + 1

    runs = preemption_runs(model, 8, budget_blocks=all_prompts_and_a_little,
                           queue_timeout_s=0.5)
    assert runs.tight.preemptions > 0
    assert all(isinstance(final, Finished) and final.usage.completion_tokens == 48
               for _, final in runs.got)
    assert [text for text, _ in runs.got] == [text for text, _ in runs.expected]


def run_choices(engine: Engine, requests: list[GenerationRequest]
                ) -> list[tuple[list[str], Finished]]:
    """Each request's text per choice (by the index its deltas carry) and final event;
    every ChoiceEnd arrives before the final and names a choice once."""
    async def read(handle, n: int) -> tuple[list[str], Finished]:
        texts, ended, final = [""] * n, [], None
        async for event in handle.events():
            if isinstance(event, Delta):
                assert event.index not in ended
                texts[event.index] += event.text
            elif isinstance(event, ChoiceEnd):
                ended.append(event.index)
            else:
                final = event
        assert sorted(ended) == (list(range(n)) if n > 1 else [])
        return texts, final

    async def main():
        engine.set_admission(Admission(mode="paused"))
        handles = [await engine.submit(r) for r in requests]
        engine.set_admission(Admission())
        return await asyncio.gather(*(read(h, r.n) for h, r in zip(handles, requests,
                                                                   strict=True)))

    return asyncio.run(main())


def exact_account(engine: Engine):
    """The ledger read on the model thread (the published account may be a step old)."""
    return engine.on_model_thread(engine.ledger.account)


def sampled(name: str, text: str, tokens: int, seed: int, **fields) -> GenerationRequest:
    sampling = SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=1.0,
                              top_p=1.0, repetition_penalty=1.0, seed=seed)
    return GenerationRequest(name, [ChatMessage("user", [TextPart(text)])], sampling, **fields)


def test_seeded_choices_say_what_single_requests_with_seed_plus_i_say(model):
    engine = started(model)
    try:
        singles = run_choices(engine, [sampled(f"s{i}", "Pick a colour", 24, 40 + i)
                                       for i in range(3)])
        [(texts, final)] = run_choices(engine, [sampled("c", "Pick a colour", 24, 40, n=3)])
        account = exact_account(engine)
    finally:
        engine.stop()
    assert texts == [t[0] for t, _ in singles]
    assert len(set(texts)) > 1  # sampling: the choices differ
    assert [e.index for e in final.choices] == [0, 1, 2]
    assert final.usage.completion_tokens == 3 * 24
    assert final.usage.prompt_tokens == singles[0][1].usage.prompt_tokens
    assert account.held_blocks == 0


@pytest.mark.parametrize("chunk", [8, 4096], ids=["long-ones-swap", "all-recompute"])
def test_choices_preempted_one_by_one_lose_nothing(model, chunk):
    """A budget that fits about two sequences: the choices of two greedy requests (each
    choice the same text) are preempted and resume on their own, and all finish with
    what an unpreempted run says."""
    requests = [greedy(f"g{i}", f"Describe place {i} " + "in detail " * (i * 5), 48, n=3)
                for i in range(2)]
    runs = preemption_runs(model, chunk, requests=requests, reader=run_choices)
    got, expected, preemptions = runs.got, runs.expected, runs.tight.preemptions
    account = exact_account(runs.tight)  # the loop has stopped: read directly
    for (texts, final), (want, _) in zip(got, expected, strict=True):
        assert texts == want and len(set(texts)) == 1  # greedy choices are identical
        assert final.usage.completion_tokens == 3 * 48
        assert [e.completion_tokens for e in final.choices] == [48, 48, 48]
    assert preemptions > 0
    assert account.held_blocks == 0 and account.swapped_bytes == 0


def test_choices_share_the_prompts_blocks_while_they_decode(model):
    """Mid-generation the ledger holds the prompt once for all choices."""
    engine = started(model)
    seen: list = []
    prompt = "Shared prompt " * 20

    async def main():
        handle = await engine.submit(greedy("shared", prompt, 40, n=4))
        async for event in handle.events():
            if isinstance(event, Delta):
                seen.append(engine.kv_account())  # published after each step
            if isinstance(event, Finished):
                return event

    try:
        final = asyncio.run(main())
    finally:
        engine.stop()
    account = max(seen, key=lambda a: a.shared_blocks)
    full_prompt_blocks = final.usage.prompt_tokens // BLOCK
    assert account.shared_blocks >= full_prompt_blocks
    assert account.held_blocks < 4 * full_prompt_blocks


def test_a_cancel_ends_every_choice_and_n_outside_its_range_is_refused(model):
    engine = started(model)

    async def main():
        handle = await engine.submit(greedy("cancelled", "Go on", 400, n=3))
        async for event in handle.events():
            if isinstance(event, Delta):
                handle.cancel()
            if isinstance(event, Finished):
                final = event
        errors = []
        for n in (0, 9):
            try:
                await engine.submit(greedy(f"bad{n}", "x", 4, n=n))
            except InvalidRequest as error:
                errors.append(error.field)
        return final, errors

    try:
        final, errors = asyncio.run(main())
        account = exact_account(engine)
    finally:
        engine.stop()
    assert final.reason is FinishReason.CANCELLED
    assert {e.reason for e in final.choices} == {FinishReason.CANCELLED}
    assert errors == ["n", "n"]
    assert account.held_blocks == 0


def test_unwritten_pool_memory_never_fails_a_request(model, monkeypatch):
    """The host pool is uninitialized memory: whatever its unwritten slots hold (here NaN,
    as a recycled page might), requests finish and keep their KV for reuse; only the
    positions a sequence wrote are checked for poison."""
    empty = KVPool._empty

    def garbage(pool: KVPool, blocks: int, device: str) -> torch.Tensor:
        tensor = empty(pool, blocks, device)
        tensor[:, pool.block_size:] = float("nan")
        return tensor

    monkeypatch.setattr(KVPool, "_empty", garbage)
    engine = started(model)
    try:
        results = run(engine, [greedy("a", "Tell me about the sea", 5),
                               greedy("b", "and about the mountains too", 7)])
        assert [final.usage.completion_tokens for _, final in results] == [5, 7]
        assert torch.isnan(engine.ledger.pool.keys[0][:, -1]).all()  # garbage was there
        assert engine.kv_account().cached_blocks > 0
    finally:
        engine.stop()
