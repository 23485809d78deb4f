"""Choosing tokens where the scores are: only the chosen ids, the usable flags and the log
probabilities a request asked for come to the host, never a vocabulary row."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from inference_svc.engine.constraints import GrammarCompiler
from inference_svc.engine.sampling import NonFiniteScores, Sampler, choose_tokens
from inference_svc.types import ResponseFormat, SamplingParams
from tests.fixtures.tiny_models import tiny_tokenizer

VOCAB = 5_000
READS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy,
         torch.Tensor.__array__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__bool__, torch.Tensor.__index__}


class HostTransfers(TorchFunctionMode):
    """Every call that brings a tensor to the host on a GPU, with how many elements it
    moves (on the CPU the same calls are made, and moving nothing is still recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.moved: list[tuple[str, int]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS:
            self.moved.append((func.__name__, args[0].numel()))
        elif func is torch.Tensor.to and _targets_host([*args[1:], kwargs.get("device")]):
            self.moved.append(("to", args[0].numel()))
        elif func is torch.Tensor.copy_ and args[0].device.type == "cpu":
            self.moved.append(("copy_", args[1].numel()))
        return func(*args, **kwargs)


def _targets_host(targets: list) -> bool:
    for target in targets:
        if isinstance(target, torch.Tensor):
            target = target.device
        if isinstance(target, str | torch.device) and torch.device(target).type == "cpu":
            return True
    return False


def batch() -> tuple[list[Sampler], list[torch.Tensor], torch.Tensor]:
    """Greedy, seeded top-p and top-k rows with penalties, a flat row whose nucleus the
    leading candidates do not hold, one held to a regex, one asking for log
    probabilities, and one with a NaN score."""
    tokenizer = tiny_tokenizer()
    grammar = GrammarCompiler(tokenizer, vocab_size=VOCAB, eos_ids=[tokenizer.eos_token_id]
                              ).compile(ResponseFormat("regex", pattern="(yes|no)!"))
    params = [
        SamplingParams(temperature=0, repetition_penalty=1.3, min_new_tokens=4),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
        SamplingParams(temperature=0.8, top_p=0.95, top_k=40, frequency_penalty=0.5,
                       presence_penalty=0.3),
        SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.0),
        SamplingParams(temperature=1.0, top_p=1.0, min_new_tokens=0),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2, logprobs=5),
        SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2),
    ]
    samplers = [Sampler.create(p, prompt_length=6, eos_ids=[2], seed=10 + row,
                               grammar=grammar if row == 5 else None)
                for row, p in enumerate(params)]
    generator = torch.Generator().manual_seed(0)
    histories = [torch.randint(0, VOCAB, (1, 6 + row), generator=generator)
                 for row in range(len(params))]
    logits = torch.randn(len(params), VOCAB, generator=generator) * 3
    logits[4] *= 0.01  # flat: its nucleus is found only by sorting the whole row
    logits[7, 11] = float("nan")
    return samplers, histories, logits


def test_no_vocabulary_row_comes_to_the_host():
    samplers, histories, logits = batch()
    with HostTransfers() as transfers:
        choices = choose_tokens(samplers, histories, logits)
    assert transfers.moved
    assert all(count < VOCAB for _, count in transfers.moved), transfers.moved
    assert all(isinstance(c, int) for c in choices[:7]), choices
    assert isinstance(choices[7], NonFiniteScores)
    assert tiny_tokenizer().decode([choices[5]]) in ("y", "ye", "yes", "n", "no")
    (recorded,) = samplers[6].take_logprobs()
    assert recorded.token_id == choices[6] and len(recorded.top) == 5
    again, _, _ = batch()
    assert choose_tokens(again, histories, logits)[:7] == choices[:7]  # the hook changes nothing


def test_a_group_that_fails_is_retried_row_by_row():
    """A history naming a token past the vocabulary breaks its group's penalty; that row
    alone fails, and the others get the tokens they get without it."""
    params = SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.2)
    histories = [torch.tensor([[1, 2, 3]]), torch.tensor([[4, VOCAB]]), torch.tensor([[5]])]
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(1))

    def samplers():
        return [Sampler.create(params, prompt_length=1, eos_ids=[0], seed=row)
                for row in range(3)]

    choices = choose_tokens(samplers(), histories, logits)
    assert isinstance(choices[1], Exception)
    fine = [0, 2]
    alone = choose_tokens([samplers()[i] for i in fine], [histories[i] for i in fine],
                          logits[fine])
    assert [choices[i] for i in fine] == alone
