"""Constrained decoding: response formats compiled to grammars, and per-row token masks.

The grammar engine is llguidance (MIT; Rust with one abi3 wheel for every CPython >= 3.9
on x86_64 and aarch64, no other dependency). It builds its lexer lazily, so compiling a
typical JSON Schema takes milliseconds, and a token mask over a 50k-150k vocabulary
about 50 microseconds on the CPU; the mask is applied to the logits on whatever device
they are, so CPU and CUDA serve the same way.

A `GrammarCompiler` belongs to one model (its tokenizer and vocabulary). It compiles at
admission, off the model thread, and caches each grammar by the hash of its content;
every sequence gets its own `RowConstraint` (a copy of the compiled matcher), which the
batched sampler asks for a mask before each token and tells the token chosen.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
import torch

from autoglm_common.bounds import clip
from inference_svc.errors import GenerationFailed, InvalidRequest
from inference_svc.types import ResponseFormat

log = structlog.get_logger(__name__)

# Compact JSON (no free whitespace between tokens): a model cannot pad its reply with
# blanks until max_new_tokens. A schema's own "x-guidance" options still override this.
JSON_OPTIONS = {"whitespace_flexible": False}
JSON_OBJECT_SCHEMA = {"type": "object"}
MAX_SCHEMA_BYTES = 256 * 1024
MAX_PATTERN_CHARS = 4096
CACHED_GRAMMARS = 256


class ConstraintFailed(GenerationFailed):
    """The grammar could not go on (an engine limit, or a token it did not allow)."""


@dataclass(frozen=True)
class Grammar:
    """A compiled response format: the matcher every sequence using it starts from."""

    key: str  # sha256 of the grammar text
    kind: str
    compile_seconds: float
    _template: object  # llguidance.LLMatcher in its initial state
    _eos_ids: tuple[int, ...]

    def start(self) -> RowConstraint:
        return RowConstraint(self._template.deep_copy(), self._eos_ids)


class RowConstraint:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, eos_ids: tuple[int, ...]) -> None:
        self._matcher = matcher
        self._eos_ids = eos_ids

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return self._eos_ids

    @property
    def accepting(self) -> bool:
        """The text so far is complete: end-of-sequence is allowed."""
        return bool(self._matcher.is_accepting())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (int32 words, CPU)."""
        words = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        if self._matcher.is_error():
            raise ConstraintFailed(f"structured output failed: {clip(self._matcher.get_error())}")

    def accept(self, token: int) -> None:
        """Advance past the chosen token (end-of-sequence only where the grammar accepts)."""
        if token in self._eos_ids:
            if not self.accepting:
                raise ConstraintFailed("end of sequence chosen before the format was complete")
            return
        if not self._matcher.consume_token(token):
            raise ConstraintFailed(f"structured output failed: {clip(self._matcher.get_error())}")


def allowed_tokens(bitmask: torch.Tensor, width: int, device: torch.device) -> torch.Tensor:
    """Unpack int32 mask words [rows, words] into booleans [rows, width] on `device`;
    columns past the mask (padding rows of a larger embedding) are not allowed."""
    shifts = torch.arange(32, dtype=torch.int32, device=device)
    bits = (bitmask.to(device).unsqueeze(-1) >> shifts) & 1
    allowed = bits.reshape(bitmask.shape[0], -1).bool()
    if allowed.shape[1] >= width:
        return allowed[:, :width]
    pad = torch.zeros((allowed.shape[0], width - allowed.shape[1]), dtype=torch.bool,
                      device=device)
    return torch.cat([allowed, pad], dim=1)


def mask_words(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.zeros((rows, (vocab_size + 31) // 32), dtype=torch.int32)


class GrammarCompiler:
    """Compiles response formats for one model's tokenizer; thread-safe, cached by content."""

    def __init__(self, tokenizer, *, vocab_size: int, eos_ids: list[int],
                 cache_entries: int = CACHED_GRAMMARS) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self._eos_ids = tuple(eos_ids)
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self._tokenizer = None

    def _llg_tokenizer(self):
        """llguidance's view of the vocabulary, built once (about 0.5 s for 49k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=list(self._eos_ids))
            return self._tokenizer

    def compile(self, response_format: ResponseFormat) -> Grammar:
        """The compiled grammar; `InvalidRequest` naming the field when it is not valid.
        Slow the first time for each content (call it off the model thread)."""
        import llguidance

        text, field = grammar_text(response_format)
        key = hashlib.sha256(text.encode()).hexdigest()
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        started = time.perf_counter()
        tokenizer = self._llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, tokenizer)
        if is_error:
            raise InvalidRequest(f"{field} is not usable: {clip(messages[0] if messages else '')}",
                                 field=field)
        matcher = llguidance.LLMatcher(tokenizer, text, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"{field} is not usable: {clip(matcher.get_error())}",
                                 field=field)
        grammar = Grammar(key, response_format.kind, time.perf_counter() - started, matcher,
                          self._eos_ids)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        log.info("grammar_compiled", kind=response_format.kind, key=key[:16],
                 seconds=round(grammar.compile_seconds, 4))
        return grammar


def grammar_text(response_format: ResponseFormat) -> tuple[str, str]:
    """llguidance's grammar for a response format, and the request field it came from."""
    import llguidance

    base = response_format.field
    if response_format.kind == "json_object":
        return (llguidance.LLMatcher.grammar_from_json_schema(JSON_OBJECT_SCHEMA,
                                                              defaults=JSON_OPTIONS),
                f"{base}.json_object")
    if response_format.kind == "json_schema":
        field = f"{base}.json_schema.schema"
        if len(response_format.schema.encode()) > MAX_SCHEMA_BYTES:
            raise InvalidRequest(f"{field} is larger than {MAX_SCHEMA_BYTES} bytes", field=field)
        try:
            schema = json.loads(response_format.schema)
        except ValueError as error:
            raise InvalidRequest(f"{field} is not valid JSON: {clip(str(error))}",
                                 field=field) from error
        if not isinstance(schema, dict):
            raise InvalidRequest(f"{field} must be a JSON object (a JSON Schema)", field=field)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), field
    if response_format.kind == "regex":
        field = f"{base}.regex"
        if not response_format.pattern:
            raise InvalidRequest(f"{field} must not be empty", field=field)
        if len(response_format.pattern) > MAX_PATTERN_CHARS:
            raise InvalidRequest(f"{field} is longer than {MAX_PATTERN_CHARS} characters",
                                 field=field)
        return llguidance.LLMatcher.grammar_from_regex(response_format.pattern), field
    raise InvalidRequest(f"{base} has an unknown kind {response_format.kind!r}", field=base)
