"""Decode steps in a captured graph's fixed shape: rows padded to a power of two, keys to
a bucket. The graph itself needs CUDA (tests/inference_svc/test_gpu.py); the shapes it
replays are checked here, eagerly, against the step they stand for."""

from __future__ import annotations

import torch

from inference_svc.model.paged.decode_graphs import KEY_BUCKET, key_bucket, row_bucket
from inference_svc.model.paged.kv_pool import KVPool, PagedStep, RowSlots
from inference_svc.types import ChatMessage, TextPart


def test_buckets_round_rows_to_powers_of_two_and_keys_to_whole_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 4, 5, 9, 16)] == [1, 2, 4, 4, 8, 16, 16]
    assert [key_bucket(n) for n in (1, KEY_BUCKET, KEY_BUCKET + 1)] == [
        KEY_BUCKET, KEY_BUCKET, 2 * KEY_BUCKET]


def prefilled(model) -> tuple[KVPool, list[list[int]], list[int], list[int]]:
    """Three prompts' KV in a pool: the pool, their block tables, lengths and last tokens."""
    from inference_svc.model.modular import DecodedMedia

    empty = DecodedMedia([], [])
    size, pool = 16, model.new_kv_pool(block_size=16, blocks=32)
    texts = ("short", "a somewhat longer prompt", "the longest prompt of all three here")
    plans = [model.plan([ChatMessage("user", [TextPart(t)])], empty, enable_thinking=False)
             for t in texts]
    tables = [[1 + 8 * i + b for b in range(8)] for i in range(len(plans))]
    for plan, table in zip(plans, tables, strict=True):
        slots = torch.tensor([table[p // size] * size + p % size
                              for p in range(len(plan.input_ids))])
        model.forward_paged(pool, [RowSlots(slots, slots)], [model.prompt_inputs(
            plan, empty).embeds])
    return pool, tables, [len(p.input_ids) for p in plans], [p.input_ids[-1] for p in plans]


def test_a_padded_bucketed_step_gives_the_real_rows_the_logits_of_the_exact_step(model):
    pool, tables, lengths, tokens = prefilled(model)

    def logits(step: PagedStep, tokens: list[int]) -> torch.Tensor:
        with model.decoder_unit.use() as decoder, torch.inference_mode():
            embeds = decoder.get_input_embeddings()(torch.tensor(tokens))[:, None]
            return model._run_decoder(decoder, step, embeds)

    exact = logits(PagedStep.decode(pool, tables, lengths, model.dtype), tokens)
    padded = PagedStep.decode(pool, [*tables, []], [*lengths, 0], model.dtype,
                              keys=key_bucket(max(lengths) + 1))
    assert padded.keys == KEY_BUCKET
    bucketed = logits(padded, [*tokens, model.placeholder_id])
    assert bucketed.shape[0] == 4
    assert torch.allclose(bucketed[:3], exact, atol=1e-4)
    assert bool(torch.isfinite(bucketed).all())


def test_a_step_that_cannot_be_captured_turns_graphs_off_and_steps_eagerly(model, monkeypatch):
    from inference_svc.model.paged.decode_graphs import CaptureFailed, DecodeGraphs

    def refuse(self, *args, **kwargs):
        raise CaptureFailed("an operation a graph cannot hold")

    monkeypatch.setattr(DecodeGraphs, "_capture", refuse)
    pool, tables, lengths, tokens = prefilled(model)  # every slot read has been written
    eager = model.decode_paged(pool, tables, lengths, tokens)
    model.decode_graphs = DecodeGraphs("cpu", max_rows=4)
    try:
        fallen_back = model.decode_paged(pool, tables, lengths, tokens)
        assert model.decode_graphs is None
    finally:
        model.decode_graphs = None
    assert torch.allclose(fallen_back, eager)


class EagerReplay:
    """Stands in for a CUDA graph on the CPU: a replay runs the recorded forward again and
    writes its logits where the graph's replays would."""

    def __init__(self, forward) -> None:
        self.forward = forward
        self.logits = forward()

    def replay(self) -> None:
        self.logits.copy_(self.forward())


def test_replays_feed_each_step_through_its_buckets_static_inputs(model, monkeypatch):
    """The bookkeeping around the graphs, on the CPU: each step's inputs reach the
    bucket's static tensors, a bucket is captured once and replayed after, and a pool
    reallocation captures again."""
    from inference_svc.model.paged.decode_graphs import DecodeGraphs

    def record(self, forward):
        replay = EagerReplay(forward)
        return replay, replay.logits

    monkeypatch.setattr(DecodeGraphs, "_record", record)
    pool, tables, lengths, tokens = prefilled(model)
    graphs = DecodeGraphs("cpu", max_rows=4)

    def step_both(rows: slice, fed: list[int] = tokens) -> None:
        args = (pool, tables[rows], lengths[rows], fed[rows])
        model.decode_graphs = None
        eager = model.decode_paged(*args)
        model.decode_graphs = graphs
        try:
            replayed = model.decode_paged(*args)
        finally:
            model.decode_graphs = None
        assert torch.allclose(replayed, eager, atol=1e-5)

    step_both(slice(0, 3))
    step_both(slice(1, 3))  # two rows: their own bucket
    step_both(slice(0, 3), [t + 1 for t in tokens])  # replayed with new inputs
    assert graphs.captures == 2
    pool.resize(pool.capacity * 2)
    step_both(slice(0, 3))
    assert graphs.captures == 3
