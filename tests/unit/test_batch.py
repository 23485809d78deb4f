"""Sampling for the running batch: every row gets what it would get alone."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import TopPLogitsWarper

from inference_svc.engine.batch import CandidateTopP


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
    from inference_svc.types import SamplingParams

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


def test_frequency_and_presence_penalties_count_each_rows_own_generated_tokens():
    from collections import Counter

    from inference_svc.engine.batch import _penalize_generated

    torch.manual_seed(2)
    generated = [torch.tensor([3, 3, 3, 9]), torch.tensor([], dtype=torch.long),
                 torch.tensor([9, 0, 9])]
    scores = torch.randn(3, 12)
    expected = scores.clone()
    for row, tokens in enumerate(generated):
        for token, count in Counter(tokens.tolist()).items():
            expected[row, token] -= 0.5 * count + 0.25
    _penalize_generated(scores, generated, 0.5, 0.25)
    assert torch.allclose(scores, expected)
    assert scores[1].tolist() == expected[1].tolist()  # a row with nothing generated
