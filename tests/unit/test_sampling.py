"""Sampling for the running batch: every row gets what it would get alone."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from inference_svc.engine.nucleus import draw_tokens


def warped(scores: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """transformers' top-k then top-p filtering: what may be drawn is finite."""
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores.clone())
    return TopPLogitsWarper(top_p)(None, scores.clone()) if top_p < 1 else scores


def generators(count: int, first_seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(first_seed + i) for i in range(count)]


def test_every_drawn_token_lies_in_the_nucleus_transformers_filters_to():
    """Peaked rows find the nucleus among 64 candidates, flat ones among 1,024 or only by
    sorting the row: each way, only tokens transformers keeps are drawn."""
    torch.manual_seed(0)
    rows = 24
    for scale in (0.3, 3.0, 30.0):
        for top_p, top_k in ((0.5, 0), (0.9, 0), (0.99, 0), (0.9, 40), (1.0, 0), (1.0, 7)):
            scores = torch.randn(rows, 50_000) * scale
            tokens, usable = draw_tokens(scores, generators(rows), top_p=top_p, top_k=top_k)
            allowed = warped(scores, top_p, top_k) > -float("inf")
            assert all(usable)
            assert all(allowed[row, token] for row, token in enumerate(tokens)), (scale, top_p)


def test_drawn_tokens_follow_the_filtered_distribution():
    """Many draws from one row's scores, each with its own seed, land on each token as
    often as the renormalized nucleus says (total variation under 0.03)."""
    vocab, draws = 5_000, 6_000
    torch.manual_seed(1)
    base = torch.randn(vocab) * 0.5  # a long tail holding about 0.5% of the mass
    base[:6] += torch.tensor([14.0, 13.5, 13.0, 12.0, 11.0, 10.0])
    for top_p, top_k in ((0.8, 0), (0.97, 0), (1.0, 0), (0.9, 3)):
        scores = base.expand(draws, vocab).contiguous()
        tokens, _ = draw_tokens(scores, generators(draws, 1000), top_p=top_p, top_k=top_k)
        expected = torch.softmax(warped(base[None], top_p, top_k)[0], dim=-1).double()
        seen = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / draws
        assert 0.5 * (seen - expected).abs().sum() < 0.03, (top_p, top_k)


def test_rows_that_cannot_be_drawn_from_say_so_and_the_others_still_draw():
    scores = torch.randn(4, 300)
    scores[1, 5] = float("nan")
    scores[2] = -float("inf")
    scores[3, 9] = float("inf")
    _, usable = draw_tokens(scores, generators(4), top_p=0.9, top_k=0)
    assert usable == [True, False, False, False]


def test_the_repetition_penalty_is_transformers_own():
    from inference_svc.engine.sampling import _penalize_repeated

    torch.manual_seed(3)
    scores = torch.randn(3, 40) * 4
    history = torch.randint(0, 40, (3, 12))
    expected = RepetitionPenaltyLogitsProcessor(1.3)(history, scores.clone())
    _penalize_repeated(scores, history, 1.3)
    assert torch.equal(scores, expected)


def test_choosing_for_a_batch_gives_each_row_what_it_would_get_alone():
    from inference_svc.engine.sampling import Sampler, choose_tokens
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

    from inference_svc.engine.sampling import _penalize_generated

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
