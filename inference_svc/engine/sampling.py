"""Sampling for the running batch: each row's next token from its own penalties and
filters and its own seeded generator."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference_svc.engine import constraints, logprobs
from inference_svc.engine.constraints import Grammar, RowConstraint
from inference_svc.engine.nucleus import draw_tokens
from inference_svc.errors import GenerationFailed
from inference_svc.types import SamplingParams


@dataclass
class Sampler:
    """One sequence's sampling state: its parameters, its own seeded generator, where it
    stands in its response format's grammar, and the log probabilities not yet streamed."""

    params: SamplingParams
    prompt_length: int
    eos_ids: list[int]
    generator: torch.Generator | None = None
    constraint: RowConstraint | None = None
    recorded: list[logprobs.RawLogprob] = field(default_factory=list)

    @classmethod
    def create(cls, sampling: SamplingParams, *, prompt_length: int, eos_ids: list[int],
               seed: int, grammar: Grammar | None = None) -> Sampler:
        generator = None if sampling.temperature <= 0 else torch.Generator().manual_seed(seed)
        constraint = grammar.start() if grammar is not None else None
        return cls(sampling, prompt_length, eos_ids, generator, constraint)

    def take_logprobs(self) -> list[logprobs.RawLogprob]:
        """The log probabilities recorded since the last call (none unless requested)."""
        taken, self.recorded = self.recorded, []
        return taken

    @property
    def group(self) -> tuple:
        """Rows with equal keys are processed as one tensor."""
        p = self.params
        return (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.frequency_penalty,
                p.presence_penalty)


class NonFiniteScores(GenerationFailed):
    """A row's next-token scores are NaN or infinite, or leave no token to choose."""

    def __init__(self) -> None:
        super().__init__("the model produced non-finite scores for this request")


Choice = int | Exception  # a row's next token, or why that row alone failed


def choose_tokens(samplers: list[Sampler], histories: list[torch.Tensor],
                  logits: torch.Tensor) -> list[Choice]:
    """Next token of every row: penalties, temperature and top-k/top-p applied per group
    of rows that share sampling parameters, then one draw from each row's own generator
    (engine/nucleus.py).

    Every operation is row-wise, so a row gets exactly what it would get alone, and a row
    that cannot be sampled fails alone: a row with non-finite scores is reported unusable
    by its group, and a group that fails is retried row by row to find the culprit.

    The scores stay on their device, where the whole group is processed at once; the
    histories and constraint masks (small) go there, and each row's seeded generator
    sends one uniform number. Only each group's chosen ids and usable flags come back,
    in one small transfer (and one per widening of a nucleus search), and the log
    probabilities a request asked for.
    """
    logits = logits.float()
    # in float64 a sum of finite float32 scores cannot overflow: it is finite exactly
    # when every score is (and it reads the scores once, isfinite().all() three times)
    finite = torch.isfinite(logits.sum(dim=-1, dtype=torch.float64))
    choices: list[Choice] = [NonFiniteScores()] * len(samplers)
    scores, failed = _apply_constraints(samplers, logits)
    groups: dict[tuple, list[int]] = {}
    for index, sampler in enumerate(samplers):
        if index in failed:
            choices[index] = failed[index]
        else:
            groups.setdefault(sampler.group, []).append(index)
    for rows in groups.values():
        at = torch.tensor(rows, device=scores.device)
        try:
            chosen = _choose_group([samplers[i] for i in rows], [histories[i] for i in rows],
                                   scores.index_select(0, at), finite.index_select(0, at))
        except Exception:
            chosen = [_choose_alone(samplers[i], histories[i], scores[i], finite[i])
                      for i in rows]
        for index, choice in zip(rows, chosen, strict=True):
            choices[index] = choice
    _advance_constraints(samplers, choices)
    _record_logprobs(samplers, choices, logits)
    return choices


def _apply_constraints(samplers: list[Sampler], logits: torch.Tensor
                       ) -> tuple[torch.Tensor, dict[int, Exception]]:
    """Rows with a response format get -inf on every token their grammar does not allow
    next (end-of-sequence only where the text so far is complete), in one masked_fill
    over those rows; free rows are untouched. The mask words are filled on the host and
    unpacked on the scores' device. Returns the scores (a new tensor where any row is
    constrained) and the rows whose grammar failed."""
    rows = [i for i, s in enumerate(samplers) if s.constraint is not None]
    if not rows:
        return logits, {}
    failed: dict[int, Exception] = {}
    words = constraints.mask_words(len(rows), logits.shape[1])
    for slot, index in enumerate(rows):
        constraint = samplers[index].constraint
        try:
            constraint.fill(words, slot)
        except Exception as error:
            failed[index] = error
    allowed = constraints.allowed_tokens(words, logits.shape[1], logits.device)
    eos_slots, eos_ids, eos_allowed = [], [], []
    for slot, index in enumerate(rows):
        constraint = samplers[index].constraint
        if index not in failed:
            eos_slots += [slot] * len(constraint.eos_ids)
            eos_ids += constraint.eos_ids
            eos_allowed += [constraint.accepting] * len(constraint.eos_ids)
    if eos_slots:
        allowed[_on(logits, eos_slots), _on(logits, eos_ids)] = _on(logits, eos_allowed)
    index = _on(logits, rows)
    masked = logits.index_select(0, index).masked_fill(~allowed, -float("inf"))
    return logits.index_put((index,), masked), failed


def _advance_constraints(samplers: list[Sampler], choices: list[Choice]) -> None:
    for index, (sampler, choice) in enumerate(zip(samplers, choices, strict=True)):
        if sampler.constraint is not None and not isinstance(choice, Exception):
            try:
                sampler.constraint.accept(choice)
            except Exception as error:
                choices[index] = error


def _record_logprobs(samplers: list[Sampler], choices: list[Choice],
                     raw: torch.Tensor) -> None:
    rows = [i for i, (s, c) in enumerate(zip(samplers, choices, strict=True))
            if s.params.logprobs is not None and not isinstance(c, Exception)]
    if not rows:
        return
    computed = logprobs.compute(raw.index_select(0, _on(raw, rows)), [choices[i] for i in rows],
                                [samplers[i].params.logprobs for i in rows])
    for index, entry in zip(rows, computed, strict=True):
        samplers[index].recorded.append(entry)


def _choose_alone(sampler: Sampler, history: torch.Tensor, logits: torch.Tensor,
                  finite: torch.Tensor) -> Choice:
    try:
        return _choose_group([sampler], [history], logits.unsqueeze(0).clone(),
                             finite.reshape(1))[0]
    except Exception as error:
        return error


def _choose_group(samplers: list[Sampler], histories: list[torch.Tensor],
                  scores: torch.Tensor, finite: torch.Tensor) -> list[Choice]:
    """The group's tokens from its own copy of the scores (changed in place); a row whose
    `finite` flag is off, or whose scores leave nothing to choose, gets NonFiniteScores."""
    params = samplers[0].params
    if params.repetition_penalty != 1.0:
        _penalize_repeated(scores, _padded_with_own_tokens(histories).to(scores.device),
                           params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        _penalize_generated(scores, [h.reshape(-1)[s.prompt_length:]
                                     for s, h in zip(samplers, histories, strict=True)],
                            params.frequency_penalty, params.presence_penalty)
    _forbid_early_eos(scores, samplers, histories, params.min_new_tokens)
    if params.temperature <= 0:
        # max gives argmax's token (the first highest score) and that score, which is NaN
        # where the row holds a NaN and -inf where every token is excluded
        best, tokens = scores.max(dim=-1)
        usable = finite & ~torch.isnan(best) & (best > -float("inf"))
        tokens, usable = torch.stack([tokens, usable.long()]).tolist()
    else:
        if params.temperature != 1.0:
            scores = scores / params.temperature
        tokens, usable = draw_tokens(scores, [s.generator for s in samplers],
                                     top_p=params.top_p, top_k=params.top_k, usable=finite)
    return [token if ok else NonFiniteScores()
            for token, ok in zip(tokens, usable, strict=True)]


def _forbid_early_eos(scores: torch.Tensor, samplers: list[Sampler],
                      histories: list[torch.Tensor], min_new_tokens: int) -> None:
    """End-of-sequence gets -inf in rows with fewer than `min_new_tokens` generated, in
    one update; a response format decides alone when the reply may end."""
    rows, columns = [], []
    for row, (sampler, history) in enumerate(zip(samplers, histories, strict=True)):
        if (sampler.constraint is None
                and history.shape[-1] - sampler.prompt_length < min_new_tokens):
            rows += [row] * len(sampler.eos_ids)
            columns += sampler.eos_ids
    if rows:
        scores[_on(scores, rows), _on(scores, columns)] = -float("inf")


def _penalize_repeated(scores: torch.Tensor, tokens: torch.Tensor, penalty: float) -> None:
    """The CTRL repetition penalty (transformers' RepetitionPenaltyLogitsProcessor), in
    place: a token already in the row's history has its score divided by `penalty`, or
    multiplied where the score is negative."""
    seen = scores.gather(1, tokens)
    scores.scatter_(1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))


def _penalize_generated(scores: torch.Tensor, generated: list[torch.Tensor], frequency: float,
                        presence: float) -> None:
    """OpenAI's additive penalties, in place: each row's score of a token it generated
    drops by `frequency` per occurrence plus `presence` once. The (row, token) pairs that
    occur are counted where the tokens are (the host, usually) and applied on the scores'
    device in one update, for every row at once."""
    tokens = torch.cat(generated)
    if tokens.numel() == 0:
        return
    rows = torch.repeat_interleave(torch.arange(len(generated), device=tokens.device),
                                   torch.tensor([len(g) for g in generated],
                                                device=tokens.device),
                                   output_size=tokens.numel())
    pairs, counts = torch.unique(rows * scores.shape[1] + tokens, return_counts=True)
    pairs = pairs.to(scores.device)
    flat = scores.view(-1)
    flat[pairs] = flat[pairs] - frequency * counts.to(scores.device, scores.dtype) - presence


def _padded_with_own_tokens(histories: list[torch.Tensor]) -> torch.Tensor:
    """Histories as one tensor; each row padded with its own first token, which a
    repetition penalty already counts, so padding changes nothing."""
    rows = [h.reshape(-1) for h in histories]
    padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
    firsts = torch.stack([r[0] for r in rows]).unsqueeze(1)
    return torch.where(padded < 0, firsts, padded)


def _on(like: torch.Tensor, values: list) -> torch.Tensor:
    """A small host list as a tensor on `like`'s device."""
    return torch.tensor(values, device=like.device)
