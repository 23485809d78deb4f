"""From generated token ids to client-visible text deltas.

Four stages, each holding back only what it must: UTF-8-safe incremental decoding,
stop-sequence matching (text that may start a stop sequence waits), splitting
`<think>...</think>` reasoning from the answer, and, for models that wrap their answer in
`<answer>...</answer>` (GLM-4.1V, AutoGLM-Phone-9B), taking those tags out of the answer
text: what the client reads as the answer is the answer itself (for the phone agent,
`do(action=...)` or `finish(message=...)` with nothing after it).
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id sequence, emitting only whole characters."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """What is left at the end; an unfinished multi-byte sequence is dropped."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :].rstrip(REPLACEMENT) if len(text) > len(prefix) else ""


def _release(buffer: str, patterns) -> tuple[str, str]:
    """What of `buffer` can go out now, and the tail that may begin one of `patterns`."""
    cut = len(buffer) - _longest_partial(buffer, patterns)
    return buffer[:cut], buffer[cut:]


def _longest_partial(buffer: str, needles: tuple[str, ...]) -> int:
    """Length of the longest suffix of buffer that is a proper prefix of a needle."""
    best = 0
    for needle in needles:
        for size in range(min(len(needle) - 1, len(buffer)), best, -1):
            if buffer.endswith(needle[:size]):
                best = size
                break
    return best


class StopSequenceMatcher:
    """Cuts the text before the first stop sequence; holds back possible beginnings."""

    def __init__(self, stop_sequences: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stop_sequences if s)
        self._buffer = ""
        self.matched: str = ""

    def push(self, text: str) -> str:
        if not self._stops:
            return text
        self._buffer += text
        hits = [(self._buffer.find(s), s) for s in self._stops if s in self._buffer]
        if hits:
            index, stop = min(hits)
            self.matched = stop
            emitted, self._buffer = self._buffer[:index], ""
            return emitted
        emitted, self._buffer = _release(self._buffer, self._stops)
        return emitted

    def flush(self) -> str:
        emitted, self._buffer = self._buffer, ""
        return emitted


@dataclass
class Split:
    answer: str = ""
    reasoning: str = ""


class ReasoningSplitter:
    """Routes text inside <think>...</think> to reasoning, the rest to the answer."""

    def __init__(self, *, start_in_reasoning: bool = False) -> None:
        self.in_reasoning = start_in_reasoning
        self._buffer = ""

    def push(self, text: str) -> Split:
        self._buffer += text
        out = Split()
        while self._buffer:
            tag = THINK_CLOSE if self.in_reasoning else THINK_OPEN
            index = self._buffer.find(tag)
            if index >= 0:
                self._route(out, self._buffer[:index])
                self._buffer = self._buffer[index + len(tag) :]
                self.in_reasoning = not self.in_reasoning
                continue
            hold = _longest_partial(self._buffer, (tag,))
            cut = len(self._buffer) - hold
            self._route(out, self._buffer[:cut])
            self._buffer = self._buffer[cut:]
            break
        return out

    def flush(self) -> Split:
        out = Split()
        self._route(out, self._buffer)
        self._buffer = ""
        return out

    def _route(self, out: Split, text: str) -> None:
        if self.in_reasoning:
            out.reasoning += text
        else:
            out.answer += text


class TagRemover:
    """Drops every occurrence of some tags from a text stream; holds back possible
    beginnings of one until the next piece says whether it is a tag."""

    def __init__(self, tags: tuple[str, ...]) -> None:
        self._tags = tuple(t for t in tags if t)
        self._buffer = ""

    def push(self, text: str) -> str:
        if not self._tags:
            return text
        self._buffer += text
        for tag in self._tags:
            self._buffer = self._buffer.replace(tag, "")
        emitted, self._buffer = _release(self._buffer, self._tags)
        return emitted

    def flush(self) -> str:
        emitted, self._buffer = self._buffer, ""
        return emitted


class TextStream:
    """Token ids in, (answer, reasoning) deltas out; knows when a stop sequence hit.

    With `answer_tags`, `<answer>` and `</answer>` are markup: they leave the answer text
    (reasoning text is left as the model wrote it).
    """

    def __init__(
        self, tokenizer, stop_sequences: tuple[str, ...], *, start_in_reasoning: bool,
        answer_tags: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopSequenceMatcher(stop_sequences)
        self._splitter = ReasoningSplitter(start_in_reasoning=start_in_reasoning)
        self._answer_tags = TagRemover((ANSWER_OPEN, ANSWER_CLOSE) if answer_tags else ())

    @property
    def stopped(self) -> bool:
        return bool(self._stops.matched)

    @property
    def matched_stop(self) -> str:
        return self._stops.matched

    @property
    def in_reasoning(self) -> bool:
        return self._splitter.in_reasoning

    def push(self, token_id: int) -> Split:
        if self.stopped:
            return Split()
        split = self._splitter.push(self._stops.push(self._detokenizer.push(token_id)))
        return Split(self._answer_tags.push(split.answer), split.reasoning)

    def finish(self) -> Split:
        if not self.stopped:
            tail = self._stops.push(self._detokenizer.flush())
            if not self.stopped:
                tail += self._stops.flush()
            pushed = self._splitter.push(tail)
        else:
            pushed = Split()
        flushed = self._splitter.flush()
        answer = self._answer_tags.push(pushed.answer + flushed.answer) + self._answer_tags.flush()
        return Split(answer, pushed.reasoning + flushed.reasoning)
