"""Out-of-memory during generation: retried once after a trim, else that request alone fails."""

from __future__ import annotations

import torch

from inference_svc.engine import batch as batch_module
from inference_svc.engine.types import (
    ChatMessage,
    Finished,
    TextPart,
)
from inference_svc.errors import ResourceExhausted
from tests.unit.engine_runs import request, run_all


def fail_prefills(monkeypatch, model, *, times: int) -> None:
    """Prompts containing BOOM run out of memory `times` times, alone or in a batch."""
    alone, together = model.prompt_embeddings, model.prefill_batch
    budget = {"left": times}

    def boom(plans) -> None:
        boom_in_prompt = any("BOOM" in model.tokenizer.decode(p.input_ids) for p in plans)
        if boom_in_prompt and budget["left"] > 0:
            budget["left"] -= 1
            raise torch.OutOfMemoryError("simulated")

    def prompt_embeddings(plan, media, **options):
        boom([plan])
        return alone(plan, media, **options)

    def prefill_batch(plans, media):
        boom(plans)
        return together(plans, media)

    monkeypatch.setattr(model, "prompt_embeddings", prompt_embeddings)
    monkeypatch.setattr(model, "prefill_batch", prefill_batch)


def test_a_transient_oom_in_prefill_is_retried_after_a_trim(model, monkeypatch):
    fail_prefills(monkeypatch, model, times=1)
    [result], _ = run_all(model, [request("BOOM once")])
    assert isinstance(result, Finished) and result.usage.completion_tokens == 6


def test_a_persistent_oom_fails_that_request_alone(model, monkeypatch):
    fail_prefills(monkeypatch, model, times=10)
    results, _ = run_all(model, [request("fine a"), request("BOOM always"), request("fine b")])
    assert isinstance(results[1], ResourceExhausted) and results[1].resource == "memory"
    assert [r.usage.completion_tokens for r in (results[0], results[2])] == [6, 6]


def test_an_oom_in_a_decode_step_rolls_back_and_retries(model, monkeypatch):
    original = batch_module.DecodeBatch.step
    calls = {"n": 0}

    def flaky_step(self, decoder):
        calls["n"] += 1
        if calls["n"] == 3:
            # fail after the first layers appended this step's KV, as a real OOM would
            decoder.model.layers[0].register_forward_hook(_raise_once)
        return original(self, decoder)

    monkeypatch.setattr(batch_module.DecodeBatch, "step", flaky_step)
    results, _ = run_all(model, [request("one", 10), request("two", 10)])
    assert [r.usage.completion_tokens for r in results] == [10, 10]


_fired = {"done": False}


def _raise_once(module, inputs, output):
    if not _fired["done"]:
        _fired["done"] = True
        raise torch.OutOfMemoryError("simulated mid-step")


def test_prompts_prefilled_together_match_each_prefilled_alone(model):
    from transformers import DynamicCache

    from inference_svc.model.modular import DecodedMedia

    empty = DecodedMedia([], [])
    plans = [model.plan([ChatMessage("user", [TextPart(text)])], empty, enable_thinking=False)
             for text in ("short", "a somewhat longer prompt", "the longest prompt of all three")]
    together, cache, mask = model.prefill_batch(plans, [empty] * 3)
    for row, plan in enumerate(plans):
        embeds = model.prompt_embeddings(plan, empty)
        alone = model.prefill_chunk(embeds, DynamicCache(), 0, len(plan.input_ids))
        assert torch.allclose(together[row], alone, atol=1e-4)
        assert int(mask[row].sum()) == len(plan.input_ids)
    assert cache.get_seq_length() == mask.shape[1]
