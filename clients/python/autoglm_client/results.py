"""Typed values a Generate stream turns into: deltas, the final message, a whole completion."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.errors import AutoglmError


class ProtocolError(AutoglmError):
    """The server's stream broke the contract (for example, no final message)."""


class FinishReason(StrEnum):
    """Why generation ended."""

    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"

    @classmethod
    def from_pb(cls, value: pb.FinishReason.ValueType) -> FinishReason:
        name = pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()
        return cls(name)


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Newly generated answer text (of choice `index`)."""

    text: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class ReasoningDelta:
    """Newly generated reasoning text (only when reasoning is requested)."""

    text: str
    index: int = 0


@dataclass(frozen=True, slots=True)
class ChoiceEnd:
    """How one choice ended (streamed when it ends, with n > 1; listed in `Final`)."""

    index: int
    finish_reason: FinishReason
    completion_tokens: int
    reasoning_tokens: int = 0
    matched_stop_sequence: str = ""

    @classmethod
    def from_pb(cls, end: pb.ChoiceEnd) -> ChoiceEnd:
        return cls(end.index, FinishReason.from_pb(end.finish_reason), end.completion_tokens,
                   end.reasoning_tokens, end.matched_stop_sequence)


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    reasoning_tokens: int = 0
    audio_seconds: float = 0.0  # GenerateLive: seconds of audio the service received

    @classmethod
    def from_pb(cls, usage: pb.Usage) -> Usage:
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_prompt_tokens=usage.cached_prompt_tokens,
            image_tokens=usage.image_tokens,
            audio_tokens=usage.audio_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            audio_seconds=usage.audio_seconds,
        )


@dataclass(frozen=True, slots=True)
class ImageSize:
    """Size an input image was encoded at, its size as received, and whether the service
    cut it to its smaller pixel budget because memory was under pressure."""

    width: int
    height: int
    original_width: int
    original_height: int
    reduced_under_pressure: bool = False


@dataclass(frozen=True, slots=True)
class Final:
    """The end of a Generate stream."""

    finish_reason: FinishReason
    usage: Usage
    matched_stop_sequence: str = ""
    images: tuple[ImageSize, ...] = ()
    request_id: str = ""
    choices: tuple[ChoiceEnd, ...] = ()  # each choice's end, with n > 1

    @classmethod
    def from_pb(cls, final: pb.FinalMessage, request_id: str) -> Final:
        return cls(
            finish_reason=FinishReason.from_pb(final.finish_reason),
            usage=Usage.from_pb(final.usage),
            matched_stop_sequence=final.matched_stop_sequence,
            images=tuple(
                ImageSize(i.width, i.height, i.original_width, i.original_height,
                          i.reduced_under_pressure)
                for i in final.images
            ),
            request_id=request_id,
            choices=tuple(ChoiceEnd.from_pb(c) for c in final.choices),
        )


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """An alternative at one position."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log probability and its most likely alternatives."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()

    @classmethod
    def from_pb(cls, entry: pb.TokenLogprob) -> TokenLogprob:
        return cls(entry.token_id, entry.token, entry.token_bytes, entry.logprob,
                   tuple(TopLogprob(a.token_id, a.token, a.token_bytes, a.logprob)
                         for a in entry.top_logprobs))


@dataclass(frozen=True, slots=True)
class Logprobs:
    """Log probabilities of tokens generated since the previous event (when requested)."""

    tokens: tuple[TokenLogprob, ...]
    index: int = 0


StreamEvent = TextDelta | ReasoningDelta | Logprobs | ChoiceEnd | Final


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a reply: its text, reasoning, log probabilities and finish reason."""

    index: int
    text: str
    reasoning: str
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole reply: the joined text and reasoning (of choice 0), the final message and,
    every choice (one unless n > 1 was asked for)."""

    text: str
    reasoning: str
    final: Final
    logprobs: tuple[TokenLogprob, ...] = ()
    choices: tuple[Choice, ...] = ()

    @property
    def usage(self) -> Usage:
        return self.final.usage

    @property
    def finish_reason(self) -> FinishReason:
        return self.final.finish_reason


def events_from_response(response: pb.GenerateResponse) -> list[StreamEvent]:
    """The events one stream message carries, in order: reasoning, text, logprobs, final."""
    events: list[StreamEvent] = []
    index = response.index
    if response.reasoning_delta:
        events.append(ReasoningDelta(response.reasoning_delta, index))
    if response.text_delta:
        events.append(TextDelta(response.text_delta, index))
    if response.logprobs:
        events.append(Logprobs(tuple(TokenLogprob.from_pb(e) for e in response.logprobs),
                               index))
    if response.HasField("choice_end"):
        events.append(ChoiceEnd.from_pb(response.choice_end))
    if response.HasField("final"):
        events.append(Final.from_pb(response.final, response.request_id))
    return events


@dataclass(slots=True)
class _ChoiceParts:
    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class CompletionAccumulator:
    """Joins stream events into a `Completion`, choice by choice."""

    parts: dict[int, _ChoiceParts] = field(default_factory=dict)
    final: Final | None = None

    def _of(self, index: int) -> _ChoiceParts:
        return self.parts.setdefault(index, _ChoiceParts())

    def add(self, event: StreamEvent) -> None:
        match event:
            case TextDelta(text=text, index=index):
                self._of(index).text.append(text)
            case ReasoningDelta(text=text, index=index):
                self._of(index).reasoning.append(text)
            case Logprobs(tokens=tokens, index=index):
                self._of(index).logprobs.extend(tokens)
            case Final():
                self.final = event

    def completion(self) -> Completion:
        final = self.final
        if final is None:
            raise ProtocolError("Generate stream ended without a final message")
        reasons = {c.index: c.finish_reason for c in final.choices} or {0: final.finish_reason}
        choices = tuple(self._choice(index, reasons[index]) for index in sorted(reasons))
        first = choices[0]
        return Completion(first.text, first.reasoning, final, first.logprobs, choices)

    def _choice(self, index: int, reason: FinishReason) -> Choice:
        parts = self.parts.get(index) or _ChoiceParts()
        return Choice(index, "".join(parts.text), "".join(parts.reasoning), reason,
                      tuple(parts.logprobs))
