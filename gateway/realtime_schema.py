"""The Realtime API's client events that the gateway takes, as pydantic models, and what
they change in a session's `Settings`.

One model reads both spellings of OpenAI's protocol: the GA one (`output_modalities`,
`max_output_tokens`, `audio.input.format`) and the beta one (`modalities`,
`max_response_output_tokens`, `input_audio_format`). Fields the gateway cannot honour are
ignored, except those whose silent loss would leave a client waiting for something that
never comes (audio output, semantic turn detection, an idle timeout, tools): those are
refused, naming the field.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autoglm_common.bounds import quote

from .errors import BadRequest, bad_request_from_validation
from .realtime_conversation import SERVICE_RATE_HZ, Audio, Item, Part, ServerVad, Settings
from .resample import resample

OPENAI_PCM_RATE_HZ = 24_000
# GA's audio/pcm names its rate; 16 kHz (the service's own) is taken as an extension
PCM_RATES_HZ = (OPENAI_PCM_RATE_HZ, SERVICE_RATE_HZ)
_UINT32_MAX = 2**32 - 1
_MAX_VAD_MS = 10_000  # of padding before the speech, or of silence that ends it

MaxTokens = int | str  # 1 to 2**32 - 1, or "inf"; checked in `_shaped`


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Lenient):
    type: str
    rate: int | None = None


class AudioInputConfig(_Lenient):
    format: AudioFormat | None = None
    turn_detection: dict[str, Any] | None = None


class AudioConfig(_Lenient):
    input: AudioInputConfig | None = None


class _Shaping(_Lenient):
    """What a session and a response both set (each spelling of OpenAI's protocol)."""

    instructions: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_output_tokens: MaxTokens | None = None
    max_response_output_tokens: MaxTokens | None = None
    output_modalities: list[str] | None = None
    modalities: list[str] | None = None
    tools: list[Any] | None = None


class SessionParams(_Shaping):
    type: str | None = None  # GA: "realtime"
    input_audio_format: str | None = None
    audio: AudioConfig | None = None
    turn_detection: dict[str, Any] | None = None


class ServerVadParams(_Lenient):
    type: Literal["server_vad"]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(default=300, ge=0, le=_MAX_VAD_MS)
    silence_duration_ms: int = Field(default=500, ge=1, le=_MAX_VAD_MS)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None


class ContentParam(_Lenient):
    type: Literal["input_text", "input_audio", "text", "output_text"]
    text: str | None = None
    audio: str | None = None


class ItemParam(_Lenient):
    id: str | None = Field(default=None, min_length=1, max_length=128)
    type: Literal["message"]
    role: Literal["user", "assistant", "system"]
    content: list[ContentParam] = Field(min_length=1)


class ResponseParams(_Shaping):
    conversation: Literal["auto", "none"] = "auto"
    input: list[ItemParam] | None = None
    metadata: dict[str, str] | None = None


class _Event(_Lenient):
    event_id: str | None = Field(default=None, max_length=128)


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionParams


class BufferAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class BufferCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class BufferClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: ItemParam
    previous_item_id: str | None = None


class ItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseParams = Field(default_factory=ResponseParams)


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


ClientEvent = (SessionUpdate | BufferAppend | BufferCommit | BufferClear | ItemCreate
               | ItemDelete | ResponseCreate | ResponseCancel)
_EVENT_MODELS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdate,
    "input_audio_buffer.append": BufferAppend,
    "input_audio_buffer.commit": BufferCommit,
    "input_audio_buffer.clear": BufferClear,
    "conversation.item.create": ItemCreate,
    "conversation.item.delete": ItemDelete,
    "response.create": ResponseCreate,
    "response.cancel": ResponseCancel,
}


def decode_event(raw: str | bytes) -> dict[str, Any]:
    """A client event's JSON object; BadRequest when it is not one."""
    try:
        event = json.loads(raw)
    except ValueError as error:
        raise BadRequest(f"the event is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise BadRequest("an event is a JSON object", code="invalid_json")
    return event


def client_event_id(event: dict[str, Any]) -> str | None:
    """The client's event_id, which errors about the event quote back."""
    event_id = event.get("event_id")
    return event_id if isinstance(event_id, str) and len(event_id) <= 128 else None


def validate_event(event: dict[str, Any]) -> ClientEvent:
    """The event as its model; BadRequest names what is wrong."""
    kind = event.get("type")
    if not isinstance(kind, str):
        raise BadRequest("the event has no string 'type'", param="type",
                         code="missing_required_parameter")
    model = _EVENT_MODELS.get(kind)
    if model is None:
        raise BadRequest(f"unknown or unsupported event type {quote(kind)}; this gateway takes "
                         + ", ".join(_EVENT_MODELS), param="type", code="invalid_value")
    try:
        return model.model_validate(event)
    except ValidationError as error:
        raise bad_request_from_validation(error.errors()) from None


def updated_session(settings: Settings, params: SessionParams) -> Settings:
    """`settings` with what a session.update sets; BadRequest for what cannot be done."""
    settings = _shaped(settings, params, "session")
    if "turn_detection" in params.model_fields_set:
        settings = replace(settings, turn_detection=_turn_detection(
            params.turn_detection, "session.turn_detection"))
    if params.audio is not None and params.audio.input is not None:
        audio_in = params.audio.input
        if "turn_detection" in audio_in.model_fields_set:
            settings = replace(settings, turn_detection=_turn_detection(
                audio_in.turn_detection, "session.audio.input.turn_detection"))
        if audio_in.format is not None:
            settings = replace(settings, input_rate_hz=_pcm_rate(audio_in.format))
    if params.input_audio_format is not None:
        if params.input_audio_format != "pcm16":
            raise BadRequest(f"session.input_audio_format {quote(params.input_audio_format)} "
                             "is not supported; use 'pcm16' (24 kHz)",
                             param="session.input_audio_format", code="invalid_value")
        settings = replace(settings, input_rate_hz=OPENAI_PCM_RATE_HZ)
    return settings


def response_settings(settings: Settings, params: ResponseParams) -> Settings:
    """The session's settings with a response.create's overrides."""
    return _shaped(settings, params, "response")


def decode_audio(data: str, param: str) -> bytes:
    """Base64 pcm16 (little-endian 16-bit samples) as bytes."""
    try:
        pcm = base64.b64decode(data, validate=True)
    except binascii.Error as error:
        raise BadRequest(f"{param} is not valid base64: {error}", param=param,
                         code="invalid_value") from None
    if len(pcm) % 2:
        raise BadRequest(f"{param} has {len(pcm)} bytes, not a whole number of 16-bit samples",
                         param=param, code="invalid_value")
    return pcm


def to_item(param: ItemParam, *, item_id: str, input_rate_hz: int, where: str) -> Item:
    """The conversation item an item parameter describes; its audio (base64 pcm16 at the
    session's input rate) is resampled to the service's rate."""
    parts: list[Part] = []
    for index, content in enumerate(param.content):
        field = f"{where}.content[{index}]"
        if content.type == "input_audio":
            if param.role != "user":
                raise BadRequest(f"{field}: only user items hold audio", param=f"{field}.type",
                                 code="invalid_value")
            if content.audio is None:
                raise BadRequest(f"{field}.audio is required for input_audio",
                                 param=f"{field}.audio", code="missing_required_parameter")
            pcm = decode_audio(content.audio, f"{field}.audio")
            parts.append(Audio(resample(pcm, input_rate_hz, SERVICE_RATE_HZ)))
        else:
            if content.text is None:
                raise BadRequest(f"{field}.text is required for {content.type}",
                                 param=f"{field}.text", code="missing_required_parameter")
            parts.append(content.text)
    return Item(item_id, param.role, parts)


def _shaped(settings: Settings, params: _Shaping, prefix: str) -> Settings:
    given = params.model_fields_set
    for name in ("output_modalities", "modalities"):
        modalities = getattr(params, name)
        if modalities is not None and set(modalities) != {"text"}:
            raise BadRequest(f"{prefix}.{name} {modalities}: this gateway answers with text "
                             "only; set it to ['text']", param=f"{prefix}.{name}",
                             code="invalid_value")
    if params.tools:
        raise BadRequest(f"{prefix}.tools: tools are not supported by the Realtime endpoint",
                         param=f"{prefix}.tools", code="invalid_value")
    if "instructions" in given:
        settings = replace(settings, instructions=params.instructions or "")
    if "temperature" in given:
        settings = replace(settings, temperature=params.temperature)
    for name in ("max_output_tokens", "max_response_output_tokens"):
        if name in given:
            limit = getattr(params, name)
            if limit != "inf" and not (isinstance(limit, int) and 1 <= limit <= _UINT32_MAX):
                raise BadRequest(f"{prefix}.{name} must be an integer from 1 to "
                                 f"{_UINT32_MAX} or 'inf', not {limit!r}",
                                 param=f"{prefix}.{name}", code="invalid_value")
            settings = replace(settings, max_output_tokens=None if limit == "inf" else limit)
    return settings


def _pcm_rate(audio_format: AudioFormat) -> int:
    param = "session.audio.input.format"
    if audio_format.type != "audio/pcm":
        raise BadRequest(f"{param}.type {quote(audio_format.type)} is not supported; use "
                         "'audio/pcm'", param=f"{param}.type", code="invalid_value")
    rate = OPENAI_PCM_RATE_HZ if audio_format.rate is None else audio_format.rate
    if rate not in PCM_RATES_HZ:
        raise BadRequest(f"{param}.rate {rate} is not supported; use 24000 (or 16000)",
                         param=f"{param}.rate", code="invalid_value")
    return rate


def _turn_detection(params: dict[str, Any] | None, param: str) -> ServerVad | None:
    if params is None:
        return None
    kind = params.get("type")
    if kind != "server_vad":
        problem = (f"{quote(kind)} is not supported" if isinstance(kind, str)
                   else "is required" if kind is None else "must be a string")
        raise BadRequest(f"{param}.type {problem}; use 'server_vad', or null "
                         "to commit the input audio buffer and send response.create yourself",
                         param=f"{param}.type",
                         code="missing_required_parameter" if kind is None else "invalid_value")
    try:
        vad = ServerVadParams.model_validate(params)
    except ValidationError as error:
        prefix = tuple(param.split("."))
        raise bad_request_from_validation(
            [{**detail, "loc": (*prefix, *detail["loc"])} for detail in error.errors()]
        ) from None
    if vad.idle_timeout_ms is not None:
        raise BadRequest(f"{param}.idle_timeout_ms: idle timeouts are not supported; leave it "
                         "null", param=f"{param}.idle_timeout_ms", code="invalid_value")
    return ServerVad(threshold=vad.threshold, prefix_padding_ms=vad.prefix_padding_ms,
                     silence_duration_ms=vad.silence_duration_ms,
                     create_response=vad.create_response,
                     interrupt_response=vad.interrupt_response)
