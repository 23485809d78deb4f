"""Turning a conversation into decoder input: token ids with slots for media embeddings."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

from inference_svc.types import AudioPart, ChatMessage, ImagePart, TextPart

_MARKER = "\ufff9{}\ufffb"  # Unicode interlinear annotation marks: never in user text
_MARKER_RE = re.compile("\ufff9(\\d+)\ufffb")


@dataclass(frozen=True)
class MediaSpan:
    kind: str  # "image" or "audio"
    index: int  # index among the request's media of that kind
    start: int
    length: int
    live: bool = False  # speech still arriving: its length grows (live_plan)


@dataclass
class PromptPlan:
    """Token ids with placeholder ids where media embeddings go."""

    input_ids: list[int]
    spans: list[MediaSpan] = field(default_factory=list)
    # input_ids with each media position replaced by an id derived from the media's bytes:
    # equal content sequences mean equal KV, which is what prefix caching needs
    content: list[int] = field(default_factory=list)
    # The reply wraps its answer in <answer>...</answer> (GLM-4.1V's format): the tags
    # are markup the text stream takes out of the answer text.
    answer_tags: bool = False
    # Its live audio is still arriving: the plan ends where the audio so far ends, and
    # what follows the audio is not in it yet (live_plan).
    open: bool = False

    @property
    def image_tokens(self) -> int:
        return sum(s.length for s in self.spans if s.kind == "image")

    @property
    def audio_tokens(self) -> int:
        return sum(s.length for s in self.spans if s.kind == "audio")


def render_prompt(
    tokenizer,
    messages: list[ChatMessage],
    *,
    enable_thinking: bool,
    media_lengths: list[int],
    media_digests: list[bytes],
    placeholder_id: int,
) -> PromptPlan:
    """Apply the chat template, then splice `media_lengths[i]` placeholder ids per medium.

    Media are numbered in request order; `media_lengths` gives each one's token count.
    """
    chat: list[dict[str, str]] = []
    kinds: list[str] = []
    for message in messages:
        pieces = []
        for part in message.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text.replace("\ufff9", "").replace("\ufffb", ""))
            else:
                kinds.append("image" if isinstance(part, ImagePart) else "audio")
                pieces.append(_MARKER.format(len(kinds) - 1))
        chat.append({"role": message.role, "content": "".join(pieces)})
    text = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    ids: list[int] = []
    content: list[int] = []
    spans: list[MediaSpan] = []
    counters = {"image": 0, "audio": 0}
    position = 0
    for match in _MARKER_RE.finditer(text):
        segment = tokenizer.encode(text[position : match.start()], add_special_tokens=False)
        ids += segment
        content += segment
        number = int(match.group(1))
        kind = kinds[number]
        spans.append(MediaSpan(kind, counters[kind], len(ids), media_lengths[number]))
        counters[kind] += 1
        ids += [placeholder_id] * media_lengths[number]
        content += media_content_ids(media_digests[number], media_lengths[number])
        position = match.end()
    tail = tokenizer.encode(text[position:], add_special_tokens=False)
    return PromptPlan(input_ids=ids + tail, spans=spans, content=content + tail)


def live_plan(base: PromptPlan, tokens: int, digest: bytes, placeholder_id: int, *,
              open: bool) -> PromptPlan:
    """`base` (rendered with its live audio 0 tokens long) with the audio `tokens` long;
    `open`: the audio goes on, so the plan stops at its end."""
    live = next(s for s in base.spans if s.live)
    at = live.start
    tail, tail_content = ([], []) if open else (base.input_ids[at:], base.content[at:])
    spans = [replace(s, length=tokens) if s is live else s for s in base.spans]
    return PromptPlan(
        input_ids=base.input_ids[:at] + [placeholder_id] * tokens + tail, spans=spans,
        content=base.content[:at] + media_content_ids(digest, tokens) + tail_content,
        answer_tags=base.answer_tags, open=open)


def media_content_ids(digest: bytes, length: int) -> list[int]:
    """Negative ids (never real tokens) unique to this medium and position."""
    base = int.from_bytes(hashlib.blake2b(digest, digest_size=7).digest(), "little")
    return [-(base + offset) - 1 for offset in range(length)]


def media_digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def media_parts(messages: list[ChatMessage]) -> list[ImagePart | AudioPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ImagePart | AudioPart)]
