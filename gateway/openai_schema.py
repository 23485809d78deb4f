"""The chat-completions request body, as pydantic models.

Only what the gateway can honour is declared; other OpenAI fields are ignored, except
those whose silent loss would change the answer's meaning (legacy functions, an
unforced tool choice; n above 8), which are rejected in `request_mapping` and `structured`. Fields
that OpenAI clients send in ``extra_body`` (``enable_thinking``, ``session_id``, ...)
arrive as top-level keys.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Lenient):
    data: str
    format: str


class AudioPart(_Lenient):
    type: Literal["input_audio"]
    input_audio: InputAudio


ContentPart = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier tool calls
    tool_call_id: str | None = None  # a tool message: the call it answers


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, le=_UINT64_MAX)
    stop: str | list[str] | None = None
    n: int | None = None

    # Extensions (OpenAI clients send these through extra_body).
    enable_thinking: bool = False
    return_reasoning: bool = False
    session_id: str | None = None
    top_k: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    min_tokens: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    priority: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)

    # Structured output (see `structured`).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # one call per reply is what is generated
    functions: list[Any] | None = None  # legacy; refused
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
