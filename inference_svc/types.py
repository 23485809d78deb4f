"""Request and event types, the bottom layer: transports convert to and from these, the
engine and the models read them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from autoglm_settings import setting


class CompiledGrammar(Protocol):
    """A compiled response format (engine/constraints.py `Grammar`): what a request
    carries to the model loop, where each sequence starts its own matcher from it."""

    key: str

    def start(self) -> object: ...


@dataclass(frozen=True)
class TextPart:
    text: str


@dataclass(frozen=True)
class ImagePart:
    data: bytes
    mime_type: str
    field: str  # where in the request it came from, for error messages


@dataclass(frozen=True)
class AudioPart:
    field: str
    wav: bytes = b""
    pcm: bytes = b""
    sample_rate: int = 0
    encoding: str = ""  # "s16le" | "f32le" for raw PCM
    channels: int = 1
    live: bool = False  # speech still arriving (GenerateLive): no data here


Part = TextPart | ImagePart | AudioPart


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    parts: list[Part]


@dataclass(frozen=True)
class ResponseFormat:
    """A format the reply must follow, enforced token by token (constrained decoding).

    `kind` is "json_object" (any JSON object), "json_schema" (`schema`, a JSON Schema as
    JSON text) or "regex" (`pattern`, the whole reply must match). `field` is where it
    came from in the request, for error messages.
    """

    kind: str
    schema: str = ""
    pattern: str = ""
    name: str = ""
    strict: bool = False
    field: str = "sampling.response_format"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. The service's defaults for what a request leaves out are settings;
    the fields below them exist only per request."""

    max_new_tokens: int = setting(256, help="default most tokens a reply may have")
    min_new_tokens: int = setting(32, help="default least tokens before end of text may "
                                           "be sampled")
    temperature: float = setting(0.7, help="default sampling temperature (0: greedy)")
    top_p: float = setting(0.9, help="default nucleus sampling mass")
    top_k: int = setting(0, help="default most candidate tokens (0: no limit)")
    repetition_penalty: float = setting(1.2, help="default repetition penalty (1: none)")
    frequency_penalty: float = setting(0.0, help="default frequency penalty")
    presence_penalty: float = setting(0.0, help="default presence penalty")
    seed: int | None = None
    stop_sequences: tuple[str, ...] = ()
    response_format: ResponseFormat | None = None
    logprobs: int | None = None  # each token's log probability and this many alternatives


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    messages: list[ChatMessage]
    sampling: SamplingParams
    session_id: str = ""
    enable_thinking: bool = False
    return_reasoning: bool = False
    priority: int = 0
    deadline: float | None = None  # time.monotonic() value
    grammar: CompiledGrammar | None = None  # the compiled response_format, set at submit
    n: int = 1  # choices generated from the prompt, sharing its KV

    @property
    def modalities(self) -> set[str]:
        kinds = {"text"}
        for message in self.messages:
            for part in message.parts:
                if isinstance(part, ImagePart):
                    kinds.add("image")
                elif isinstance(part, AudioPart):
                    kinds.add("audio")
        return kinds


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    image_tokens: int = 0
    audio_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class ImageSize:
    width: int
    height: int
    original_width: int
    original_height: int
    reduced_under_pressure: bool = False


@dataclass(frozen=True)
class TokenAlternative:
    token_id: int
    token: str  # the token's own text (U+FFFD where it holds part of a character)
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log probability and the most likely alternatives."""

    token_id: int
    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TokenAlternative, ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str = ""
    reasoning: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()  # tokens generated since the previous delta
    index: int = 0  # the choice it belongs to


@dataclass(frozen=True)
class ChoiceEnd:
    """How one choice ended; streamed when it ends (n > 1) and listed in `Finished`."""

    index: int
    reason: FinishReason
    completion_tokens: int
    reasoning_tokens: int = 0
    matched_stop_sequence: str = ""


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    usage: Usage
    matched_stop_sequence: str = ""
    images: list[ImageSize] = field(default_factory=list)
    choices: tuple[ChoiceEnd, ...] = ()  # each choice's end, when n > 1


Event = Delta | ChoiceEnd | Finished
