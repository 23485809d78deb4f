"""Token ids to client text: UTF-8 safety, stop sequences, reasoning split."""

from __future__ import annotations

import pytest

from inference_svc.engine.text_stream import (
    IncrementalDetokenizer,
    ReasoningSplitter,
    StopSequenceMatcher,
    TagRemover,
    TextStream,
)


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for splitting characters."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def stream_text(text: str) -> list[str]:
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(t) for t in tokenizer.encode(text)]
    pieces.append(detokenizer.flush())
    return [p for p in pieces if p]


def test_multibyte_characters_are_never_split():
    pieces = stream_text("你是谁?今天天气很好 🙂 ok")
    assert "".join(pieces) == "你是谁?今天天气很好 🙂 ok"
    assert all("\ufffd" not in p for p in pieces)
    assert "你" in pieces and "🙂" in pieces  # each emitted whole, once complete


def test_an_unfinished_character_at_the_end_is_dropped_not_mangled():
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    ids = tokenizer.encode("ab你")[:-1]  # cut inside the last character
    out = "".join(detokenizer.push(t) for t in ids) + detokenizer.flush()
    assert out == "ab"


def test_invalid_bytes_become_one_replacement_character_each_time():
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    out = "".join(detokenizer.push(t) for t in [0x61, 0xFF, 0x62]) + detokenizer.flush()
    assert out == "a\ufffdb"


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted", "matched"),
    [
        (["Hello wor", "ld STOP here"], ("STOP",), "Hello world ", "STOP"),
        (["abc", "S", "TO", "P"], ("STOP",), "abc", "STOP"),
        (["no stop", " at all"], ("STOP",), "no stop at all", ""),
        (["x<", "/s>y"], ("</s>", "zz"), "x", "</s>"),
        (["aST", "Ob"], ("STOP",), "aSTOb", ""),
    ],
)
def test_stop_sequences_hold_back_only_possible_beginnings(chunks, stops, emitted, matched):
    matcher = StopSequenceMatcher(stops)
    out = "".join(matcher.push(c) for c in chunks)
    if not matcher.matched:
        out += matcher.flush()
    assert out == emitted
    assert matcher.matched == matched


def test_reasoning_is_split_from_the_answer_across_chunk_boundaries():
    splitter = ReasoningSplitter()
    answer = reasoning = ""
    for chunk in ["<th", "ink>let me ", "think</thi", "nk>The answer", " is 4."]:
        part = splitter.push(chunk)
        answer += part.answer
        reasoning += part.reasoning
    tail = splitter.flush()
    assert reasoning + tail.reasoning == "let me think"
    assert answer + tail.answer == "The answer is 4."


def test_a_prompt_that_opened_think_starts_in_reasoning():
    splitter = ReasoningSplitter(start_in_reasoning=True)
    part = splitter.push("plan</think>done")
    assert (part.reasoning, part.answer) == ("plan", "done")


def test_text_stream_stops_and_ignores_tokens_after_a_stop_sequence():
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer, ("END",), start_in_reasoning=False)
    answer = ""
    for token in tokenizer.encode("你好END more"):
        answer += stream.push(token).answer
    answer += stream.finish().answer
    assert answer == "你好"
    assert stream.stopped and stream.matched_stop == "END"


def run_stream(text: str, *, answer_tags: bool, stops: tuple[str, ...] = ()) -> tuple[str, str]:
    """(answer, reasoning) of a byte-per-token stream of `text`."""
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer, stops, start_in_reasoning=False, answer_tags=answer_tags)
    answer = reasoning = ""
    for token in tokenizer.encode(text):
        part = stream.push(token)
        answer, reasoning = answer + part.answer, reasoning + part.reasoning
    tail = stream.finish()
    return answer + tail.answer, reasoning + tail.reasoning


GLM_REPLY = ('<think>\nThe home screen; open Settings.\n</think>\n'
             '<answer>do(action="Launch", app="设置")</answer>')


def test_answer_tags_leave_the_answer_and_reasoning_is_split():
    answer, reasoning = run_stream(GLM_REPLY, answer_tags=True)
    assert reasoning == "\nThe home screen; open Settings.\n"
    assert answer == '\ndo(action="Launch", app="设置")'


def test_without_answer_tags_the_text_is_unchanged():
    answer, _ = run_stream(GLM_REPLY, answer_tags=False)
    assert answer == '\n<answer>do(action="Launch", app="设置")</answer>'


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        (["<ans", "wer>x</an", "swer>"], "x"),
        (["a <", "b> c"], "a <b> c"),
        (["ends with </ans"], "ends with </ans"),  # a partial tag at the end is text
        (["<answer><answer>y"], "y"),
    ],
)
def test_tag_remover_holds_back_only_possible_tags(chunks, expected):
    remover = TagRemover(("<answer>", "</answer>"))
    out = "".join(remover.push(c) for c in chunks) + remover.flush()
    assert out == expected


def test_stop_sequences_apply_before_answer_tags_are_taken_out():
    answer, _ = run_stream("<answer>finish(message=\"ok\")</answer>STOP junk",
                           answer_tags=True, stops=("STOP",))
    assert answer == 'finish(message="ok")'
