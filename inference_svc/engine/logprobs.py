"""Log probabilities of generated tokens, with the most likely alternatives.

They are the model's own distribution at each step (log-softmax of the raw logits, as
OpenAI and vLLM report them): before penalties, temperature, top-k/top-p and any
response-format mask. The chosen token's entry and its entry among the alternatives are
read from the same tensor, so they are equal wherever both appear.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from inference_svc.types import TokenAlternative, TokenLogprob

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True, slots=True)
class RawLogprob:
    """What the sampler records per token; turned into text by `describe`."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def compute(logits: torch.Tensor, chosen: list[int], tops: list[int]) -> list[RawLogprob]:
    """Each row's chosen token's log probability and its `tops[i]` best alternatives,
    found on the logits' device; only those values and ids come to the host, as one
    table (the ids are exact in float64, the values are float32 widened)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(chosen, device=logprobs.device).unsqueeze(1)
    columns = [logprobs.gather(1, index)]
    most = max(tops, default=0)
    if most:
        values, ids = torch.topk(logprobs, most, dim=-1)
        columns += [values, ids]
    table = torch.cat([c.double() for c in columns], dim=1).tolist()
    out = []
    for token, row, k in zip(chosen, table, tops, strict=True):
        top = tuple(zip([int(i) for i in row[1 + most : 1 + most + k]], row[1 : 1 + k],
                        strict=True))
        out.append(RawLogprob(token, row[0], top))
    return out


def describe(raw: RawLogprob, tokenizer) -> TokenLogprob:
    text, data = token_text(tokenizer, raw.token_id)
    alternatives = []
    for token_id, value in raw.top:
        alt_text, alt_bytes = token_text(tokenizer, token_id)
        alternatives.append(TokenAlternative(token_id, alt_text, alt_bytes, value))
    return TokenLogprob(raw.token_id, text, data, raw.logprob, tuple(alternatives))


def token_text(tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token's own bytes (exact for byte-level BPE and byte-fallback vocabularies) and
    its text (U+FFFD standing for an incomplete character)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return "", b""
    if _byte_level(tokenizer) and all(c in _BYTE_OF_CHAR for c in piece):
        data = bytes(_BYTE_OF_CHAR[c] for c in piece)
    elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        data = bytes([int(piece[3:5], 16)])  # sentencepiece byte fallback
    else:
        data = tokenizer.decode([token_id]).encode()
    return data.decode("utf-8", errors="replace"), data


@functools.lru_cache(maxsize=8)
def _byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and "ByteLevel" in repr(decoder)


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values, inverted."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF_CHAR = _bytes_to_unicode()
