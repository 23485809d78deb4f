"""The running batch: joining and leaving keep every row's KV exactly."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from inference_svc.engine.batch import CandidateTopP, DecodeBatch, Row
from tests.unit.test_sessions import cache_of


def test_rows_of_different_lengths_join_and_leave_with_their_own_kv():
    batch = DecodeBatch()
    short, long = cache_of(3), cache_of(7)
    expected_short = short.layers[0].keys.clone()
    expected_long = long.layers[1].values.clone()
    batch.add(Row("short", 3), short)
    batch.add(Row("long", 7), long)
    assert batch.width == 7
    assert batch.mask.tolist() == [[0, 0, 0, 0, 1, 1, 1], [1] * 7]
    taken = batch.remove({"short"})
    assert torch.equal(taken["short"].layers[0].keys, expected_short)
    assert [r.key for r in batch.rows] == ["long"]
    assert torch.equal(batch.cache.layers[1].values, expected_long)


def test_padding_columns_go_when_the_longest_row_leaves():
    batch = DecodeBatch()
    batch.add(Row("a", 2), cache_of(2))
    batch.add(Row("b", 9), cache_of(9))
    batch.remove({"b"})
    assert batch.width == 2 and batch.mask.tolist() == [[1, 1]]
    batch.remove({"a"})
    assert len(batch) == 0 and batch.cache is None


def test_candidate_top_p_filters_exactly_like_transformers():
    torch.manual_seed(0)
    for scale in (0.5, 3.0, 30.0):
        for top_p in (0.5, 0.9, 0.99):
            scores = torch.randn(1, 50_000) * scale
            reference = TopPLogitsWarper(top_p)(None, scores.clone())
            fast = CandidateTopP(top_p)(None, scores.clone())
            assert torch.equal(torch.isinf(reference), torch.isinf(fast))


def test_choosing_for_a_batch_gives_each_row_what_it_would_get_alone():
    from inference_svc.engine.batch import Sampler, choose_tokens
    from inference_svc.engine.types import SamplingParams

    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.3,
                            frequency_penalty=0.5, presence_penalty=0.2, min_new_tokens=3)
    torch.manual_seed(1)
    histories = [torch.randint(0, 300, (1, n)) for n in (5, 9, 14)]
    logits = torch.randn(3, 300) * 3
    prompt_lengths = [4, 4, 12]

    def samplers():
        return [Sampler.create(params, prompt_length=p, eos_ids=[7], seed=100 + i)
                for i, p in enumerate(prompt_lengths)]

    together = choose_tokens(samplers(), histories, logits)
    alone = [choose_tokens([s], [h], logits[i : i + 1])[0]
             for i, (s, h) in enumerate(zip(samplers(), histories, strict=True))]
    assert together == alone
    greedy = SamplingParams(temperature=0, min_new_tokens=0, repetition_penalty=1.0)
    sampler = Sampler.create(greedy, prompt_length=0, eos_ids=[0], seed=0)
    assert choose_tokens([sampler], [histories[0]], logits[:1]) == [int(logits[0].argmax())]
