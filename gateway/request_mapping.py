"""OpenAI chat-completions request -> `GenerateRequest` of the gRPC contract."""

from __future__ import annotations

import base64
import binascii
import json
import re

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_common.bounds import quote

from .errors import BadRequest
from .openai_schema import AudioPart, ChatCompletionRequest, ChatMessage, ImagePart, TextPart
from .structured import StructuredPlan
from .structured import plan as plan_structured

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}
_IMAGE_MIME_TYPES = {
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
    "image/webp": "image/webp",
}
_AUDIO_FORMATS = {"wav"}
# Most choices a request may ask for (the service's own limit, GenerateRequest.n).
MAX_CHOICES = 8
_DATA_URI = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<payload>.*)", re.DOTALL)


def to_generate_request(body: ChatCompletionRequest,
                        structured: StructuredPlan | None = None) -> pb.GenerateRequest:
    """Build the gRPC request; raises `BadRequest` for what the service cannot honour."""
    _reject_unsupported(body)
    if structured is None:
        structured = plan_structured(body)
    messages = [
        _to_message(message, f"messages[{i}]") for i, message in enumerate(body.messages)
    ]
    if structured.instructions:
        messages.insert(0, pb.Message(role=pb.ROLE_SYSTEM,
                                      parts=[pb.Part(text=structured.instructions)]))
    sampling = _to_sampling(body)
    if structured.response_format is not None:
        sampling.response_format.CopyFrom(structured.response_format)
    if structured.logprobs is not None:
        sampling.logprobs = structured.logprobs
    request = pb.GenerateRequest(
        messages=messages,
        sampling=sampling,
        enable_thinking=body.enable_thinking,
        return_reasoning=body.return_reasoning,
    )
    if body.session_id is not None:
        request.session_id = body.session_id
    if body.priority is not None:
        request.priority = body.priority
    if body.n is not None and body.n > 1:
        request.n = body.n
    return request


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
        raise BadRequest(f"n must be between 1 and {MAX_CHOICES}", param="n",
                         code="invalid_value")


def _to_sampling(body: ChatCompletionRequest) -> pb.SamplingParams:
    # Proto3 `optional` fields: set only what the client sent, so the server's defaults
    # apply to the rest.
    sampling = pb.SamplingParams()
    max_tokens = body.max_completion_tokens or body.max_tokens
    optional_fields = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": body.min_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repetition_penalty": body.repetition_penalty,
        "frequency_penalty": body.frequency_penalty,
        "presence_penalty": body.presence_penalty,
        "seed": body.seed,
    }
    for field, value in optional_fields.items():
        if value is not None:
            setattr(sampling, field, value)
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    for i, stop in enumerate(stops):
        if not stop:
            raise BadRequest("stop sequences must not be empty", param=f"stop[{i}]")
    sampling.stop_sequences.extend(stops)
    return sampling


def _to_message(message: ChatMessage, param: str) -> pb.Message:
    if message.role == "tool":  # a tool's result, told to the model as user text
        return pb.Message(role=pb.ROLE_USER, parts=[pb.Part(
            text=f"Result of tool call {message.tool_call_id or ''}: {_text_of(message)}")])
    role = _ROLES[message.role]
    if message.role == "assistant" and message.tool_calls and not message.content:
        calls = [call.get("function", {}) for call in message.tool_calls]
        return pb.Message(role=role, parts=[pb.Part(text=json.dumps(calls, ensure_ascii=False))])
    if message.content is None:
        raise BadRequest("message content is required", param=f"{param}.content")
    if isinstance(message.content, str):
        return pb.Message(role=role, parts=[pb.Part(text=message.content)])
    parts = [_to_part(part, f"{param}.content[{i}]") for i, part in enumerate(message.content)]
    return pb.Message(role=role, parts=parts)


def _text_of(message: ChatMessage) -> str:
    if isinstance(message.content, str):
        return message.content
    return "".join(p.text for p in message.content or [] if isinstance(p, TextPart))


def _to_part(part: TextPart | ImagePart | AudioPart, param: str) -> pb.Part:
    if isinstance(part, TextPart):
        return pb.Part(text=part.text)
    if isinstance(part, ImagePart):
        return pb.Part(image=_to_image(part.image_url.url, f"{param}.image_url.url"))
    return pb.Part(audio=_to_audio(part, f"{param}.input_audio"))


def _to_image(url: str, param: str) -> pb.Image:
    if url.startswith(("http://", "https://")):
        raise BadRequest(
            "image URLs are not fetched (the service has no internet access); "
            "send the image inline as a data: URI",
            param=param,
            code="unsupported_value",
        )
    match = _DATA_URI.fullmatch(url)
    if match is None:
        raise BadRequest("image_url must be a data: URI", param=param, code="invalid_value")
    mime_type = _IMAGE_MIME_TYPES.get(match["mime"].lower())
    if mime_type is None:
        raise BadRequest(
            f"unsupported image type {quote(match['mime'])}; "
            "use image/png, image/jpeg or image/webp",
            param=param,
            code="invalid_value",
        )
    if ";base64" not in match["params"].lower():
        raise BadRequest("image data: URIs must be base64-encoded", param=param)
    return pb.Image(data=_decode_base64(match["payload"], param), mime_type=mime_type)


def _to_audio(part: AudioPart, param: str) -> pb.Audio:
    audio_format = part.input_audio.format.lower()
    if audio_format not in _AUDIO_FORMATS:
        raise BadRequest(
            f"unsupported audio format {quote(part.input_audio.format)}; use 'wav'",
            param=f"{param}.format",
            code="invalid_value",
        )
    return pb.Audio(wav=_decode_base64(part.input_audio.data, f"{param}.data"))


def _decode_base64(payload: str, param: str) -> bytes:
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise BadRequest(f"invalid base64 data: {error}", param=param) from error
    if not data:
        raise BadRequest("media data is empty", param=param)
    return data
