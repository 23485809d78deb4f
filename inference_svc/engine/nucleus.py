"""Drawing one token per row from top-k/top-p filtered scores, without sorting the
vocabulary.

transformers' warpers sort every row's whole vocabulary for top-p, mask the rest with
full-size tensors, then `multinomial` draws one exponential per vocabulary entry. On a
49k vocabulary that was most of the 33 ms the CPU spent choosing 16 rows' tokens. Here the
nucleus is found among the row's leading candidates (`torch.topk`, widened only when
they do not hold top_p of the mass, which for a trained model at a usual temperature is
rare), and each row draws a single uniform number from its own generator and takes the
token where the nucleus' cumulative mass passes it (inverse transform sampling). The
result is the distribution transformers' warpers give; which token a seed picks differs.

It all runs where the scores are (a GPU's logits never cross to the host): only the
uniforms go there, from the generators on the CPU, and only the tokens and usable flags
come back, in one small transfer (one more per widening).
"""

from __future__ import annotations

import torch

# candidate widths tried in turn; the last step sorts the whole row
CANDIDATE_WIDTHS = (64, 1024)


def draw_tokens(scores: torch.Tensor, generators: list[torch.Generator], *, top_p: float,
                top_k: int, usable: torch.Tensor | None = None) -> tuple[list[int], list[bool]]:
    """Row r's token, sampled from softmax(scores[r]) restricted to its `top_k` (0: no
    limit) most likely tokens and then to its nucleus of mass `top_p`, with one draw
    from `generators[r]`; and whether the row could be sampled at all (its scores hold no
    NaN or +inf, not every token is excluded, and `usable[r]` where given: a row known
    unusable is not searched further)."""
    rows, vocab = scores.shape
    uniforms = torch.stack([torch.rand((), generator=g, dtype=torch.float64)
                            for g in generators]).to(scores.device)
    if 0 < top_k < vocab:  # the candidates are exactly the top k, normalized among them
        top, index = torch.topk(scores, top_k, dim=-1)
        norm = torch.logsumexp(top, dim=-1)
        tokens = _draw_sorted(top, index, norm, top_p, uniforms)
        return _to_host(tokens, _drawable(norm, usable))
    norm = torch.logsumexp(scores, dim=-1)
    if top_p >= 1.0:  # the whole distribution: inverse transform in vocabulary order
        probs = torch.exp((scores - norm[:, None]).double())
        tokens = _first_past(probs.cumsum(dim=-1), uniforms * probs.sum(dim=-1))
        return _to_host(tokens.clamp(max=vocab - 1), _drawable(norm, usable))
    drawable = _drawable(norm, usable)
    tokens, ok = [0] * rows, [False] * rows
    pending = list(range(rows))  # rows whose nucleus the candidates do not hold yet
    for width in (*[w for w in CANDIDATE_WIDTHS if w < vocab], vocab):
        at = torch.tensor(pending, device=scores.device)
        part = scores if len(pending) == rows else scores[at]
        if width < vocab:
            top, index = torch.topk(part, width, dim=-1)
        else:
            top, index = torch.sort(part, dim=-1, descending=True)
        held = torch.exp(top - norm[at, None]).sum(dim=-1)
        # a row that cannot be drawn from is done: no width would change that
        covered = (held >= top_p) | (width == vocab) | ~drawable[at]
        drawn = _draw_sorted(top, index, norm[at], top_p, uniforms[at])
        found = torch.stack([drawn, covered.long(), drawable[at].long()]).tolist()
        left = []
        for row, token, done, fine in zip(pending, *found, strict=True):
            if done:
                tokens[row], ok[row] = token, bool(fine)
            else:
                left.append(row)
        if not left:
            break
        pending = left
    return tokens, ok


def _draw_sorted(top: torch.Tensor, index: torch.Tensor, norm: torch.Tensor, top_p: float,
                 uniforms: torch.Tensor) -> torch.Tensor:
    """Draw from candidates sorted by score, descending, which hold the nucleus: a
    candidate belongs to it while the mass before it is below top_p (the first always)."""
    probs = torch.exp((top - norm[:, None]).double())
    before = probs.cumsum(dim=-1) - probs
    kept = torch.where(before < top_p, probs, 0.0)
    kept[:, 0] = probs[:, 0]
    cumulative = kept.cumsum(dim=-1)
    size = (kept > 0).sum(dim=-1).clamp(min=1)
    position = torch.minimum(_first_past(cumulative, uniforms * cumulative[:, -1]), size - 1)
    return index.gather(1, position[:, None]).reshape(-1)


def _first_past(cumulative: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the first position whose cumulative mass exceeds the target."""
    return torch.searchsorted(cumulative, targets[:, None].contiguous(), right=True).reshape(-1)


def _drawable(norm: torch.Tensor, usable: torch.Tensor | None) -> torch.Tensor:
    finite = torch.isfinite(norm)
    return finite if usable is None else finite & usable


def _to_host(tokens: torch.Tensor, ok: torch.Tensor) -> tuple[list[int], list[bool]]:
    tokens, ok = torch.stack([tokens, ok.long()]).tolist()
    return tokens, [bool(flag) for flag in ok]
