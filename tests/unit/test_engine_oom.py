"""Out-of-memory during generation: retried once after a trim, else that request alone fails."""

from __future__ import annotations

import torch

from inference_svc.engine.runner import ModelRunner
from inference_svc.errors import ResourceExhausted
from inference_svc.types import (
    ChatMessage,
    Finished,
    TextPart,
)
from tests.unit.engine_runs import request, run_all


def fail_prefills(monkeypatch, model, *, times: int) -> list[str]:
    """Prompts containing BOOM run out of memory `times` times when their inputs are made;
    the returned list records each injected error (monkeypatch undoes the patch)."""
    alone = model.prompt_inputs
    injected: list[str] = []

    def boom(plans) -> None:
        boom_in_prompt = any("BOOM" in model.tokenizer.decode(p.input_ids) for p in plans)
        if boom_in_prompt and len(injected) < times:
            injected.append("prefill")
            raise torch.OutOfMemoryError("simulated")

    def prompt_inputs(plan, media, **options):
        boom([plan])
        return alone(plan, media, **options)

    monkeypatch.setattr(model, "prompt_inputs", prompt_inputs)
    return injected


def test_a_transient_oom_in_prefill_is_retried_after_a_trim(model, monkeypatch):
    injected = fail_prefills(monkeypatch, model, times=1)
    [result], _ = run_all(model, [request("BOOM once")])
    assert injected == ["prefill"]
    assert isinstance(result, Finished) and result.usage.completion_tokens == 6


def test_a_persistent_oom_fails_that_request_alone(model, monkeypatch):
    injected = fail_prefills(monkeypatch, model, times=10)
    results, _ = run_all(model, [request("fine a"), request("BOOM always"), request("fine b")])
    assert len(injected) == 2  # the first try and the one retry after a trim
    assert isinstance(results[1], ResourceExhausted) and results[1].resource == "memory"
    assert [r.usage.completion_tokens for r in (results[0], results[2])] == [6, 6]


def test_an_oom_in_a_decode_step_is_retried(model, monkeypatch):
    """An out-of-memory error after the first layers wrote this step's KV: the step runs
    again (writing the same slots), and both requests complete with every token."""
    original = ModelRunner._decode_pass
    calls = {"n": 0}
    fired = []

    def raise_once(module, inputs, output):
        if not fired:
            fired.append(True)
            raise torch.OutOfMemoryError("simulated mid-step")

    def flaky_decode(self, plan):
        calls["n"] += 1
        if calls["n"] != 3:
            return original(self, plan)
        with self.model.decoder_unit.use() as decoder:
            hook = decoder.model.layers[1].register_forward_hook(raise_once)
        try:
            return original(self, plan)
        finally:
            hook.remove()

    monkeypatch.setattr(ModelRunner, "_decode_pass", flaky_decode)
    results, _ = run_all(model, [request("one", 10), request("two", 10)])
    assert fired == [True]
    assert [r.usage.completion_tokens for r in results] == [10, 10]


def test_prompts_prefilled_together_match_each_prefilled_alone(model):
    from inference_svc.model.modular import DecodedMedia
    from inference_svc.model.paged.kv_pool import RowSlots

    empty = DecodedMedia([], [])
    plans = [model.plan([ChatMessage("user", [TextPart(text)])], empty, enable_thinking=False)
             for text in ("short", "a somewhat longer prompt", "the longest prompt of all three")]
    embeds = [model.prompt_inputs(plan, empty).embeds for plan in plans]
    size, pool = 16, model.new_kv_pool(block_size=16, blocks=16)

    def segment(first_block: int, length: int) -> RowSlots:
        slots = torch.tensor([(first_block + p // size) * size + p % size
                              for p in range(length)])
        return RowSlots(slots, slots)

    segments = [segment(1 + 4 * i, e.shape[0]) for i, e in enumerate(embeds)]
    together = model.forward_paged(pool, segments, embeds)
    for row, (seg, embed) in enumerate(zip(segments, embeds, strict=True)):
        own_pool = model.new_kv_pool(block_size=16, blocks=16)
        alone = model.forward_paged(own_pool, [seg], [embed])
        assert torch.allclose(together[row], alone[0], atol=1e-4)
        # the packed pass wrote each prompt's KV as a pass of its own does
        assert torch.allclose(pool.keys[0][:, seg.write], own_pool.keys[0][:, seg.write], atol=1e-4)
