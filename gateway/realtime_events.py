"""The Realtime API's server events, as JSON objects, in the connection's dialect.

OpenAI's SDK speaks two: the GA protocol (`client.realtime.connect`) and the beta one
(`client.beta.realtime.connect`, which sends ``OpenAI-Beta: realtime=v1``). They differ in
a few names: the session's fields, the text events (`response.output_text.*` against
`response.text.*`), an assistant's content type (`output_text` against `text`), and how a
new item is announced (`conversation.item.added` and `.done` against
`conversation.item.created`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from autoglm.inference.v1 import inference_service_pb2 as pb

from .errors import GatewayError
from .realtime_conversation import SERVICE_RATE_HZ, Item, ServerVad, Settings

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ResponseState:
    """What response.created and response.done say about one response."""

    id: str
    settings: Settings
    metadata: dict[str, str] | None
    conversation_id: str | None  # None: an out-of-band response (conversation "none")
    status: str = "in_progress"
    status_details: dict[str, Any] | None = None
    output: list[Item] | None = None
    usage: pb.Usage | None = None


class RealtimeEvents:
    def __init__(self, *, beta: bool, model: str, session_id: str) -> None:
        self.beta = beta
        self.model = model
        self.session_id = session_id
        self._text = "response.text" if beta else "response.output_text"

    def session_created(self, settings: Settings) -> Event:
        return _event("session.created", session=self._session(settings))

    def session_updated(self, settings: Settings) -> Event:
        return _event("session.updated", session=self._session(settings))

    def error(self, error: GatewayError, client_event_id: str | None) -> Event:
        return _event("error", error={
            "type": error.error_type, "code": error.code, "message": error.message,
            "param": error.param, "event_id": client_event_id,
        })

    def speech_started(self, at_sample: int, item_id: str) -> Event:
        return _event("input_audio_buffer.speech_started", audio_start_ms=_ms(at_sample),
                      item_id=item_id)

    def speech_stopped(self, at_sample: int, item_id: str) -> Event:
        return _event("input_audio_buffer.speech_stopped", audio_end_ms=_ms(at_sample),
                      item_id=item_id)

    def buffer_committed(self, item_id: str, previous_item_id: str | None) -> Event:
        return _event("input_audio_buffer.committed", previous_item_id=previous_item_id,
                      item_id=item_id)

    def buffer_cleared(self) -> Event:
        return _event("input_audio_buffer.cleared")

    def item_added(self, item: Item, previous_item_id: str | None) -> list[Event]:
        """A new item; GA also says it is done when it is not being generated."""
        if self.beta:
            return [_event("conversation.item.created", previous_item_id=previous_item_id,
                           item=self.item(item))]
        added = [_event("conversation.item.added", previous_item_id=previous_item_id,
                        item=self.item(item))]
        if item.status != "in_progress":
            added += self.item_done(item, previous_item_id)
        return added

    def item_done(self, item: Item, previous_item_id: str | None) -> list[Event]:
        if self.beta:
            return []
        return [_event("conversation.item.done", previous_item_id=previous_item_id,
                       item=self.item(item))]

    def item_deleted(self, item_id: str) -> Event:
        return _event("conversation.item.deleted", item_id=item_id)

    def response_created(self, response: ResponseState) -> Event:
        return _event("response.created", response=self._response(response))

    def response_done(self, response: ResponseState) -> Event:
        return _event("response.done", response=self._response(response))

    def output_item_added(self, response_id: str, item: Item) -> Event:
        return _event("response.output_item.added", response_id=response_id, output_index=0,
                      item=self.item(item))

    def output_item_done(self, response_id: str, item: Item) -> Event:
        return _event("response.output_item.done", response_id=response_id, output_index=0,
                      item=self.item(item))

    def content_part_added(self, response_id: str, item_id: str) -> Event:
        return _event("response.content_part.added", **_at(response_id, item_id),
                      part={"type": "text", "text": ""})

    def content_part_done(self, response_id: str, item_id: str, text: str) -> Event:
        return _event("response.content_part.done", **_at(response_id, item_id),
                      part={"type": "text", "text": text})

    def text_delta(self, response_id: str, item_id: str, delta: str) -> Event:
        return _event(f"{self._text}.delta", **_at(response_id, item_id), delta=delta)

    def text_done(self, response_id: str, item_id: str, text: str) -> Event:
        return _event(f"{self._text}.done", **_at(response_id, item_id), text=text)

    def item(self, item: Item) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        for part in item.parts:
            if not isinstance(part, str):
                content.append({"type": "input_audio", "transcript": None})
            elif item.role == "assistant":
                content.append({"type": "text" if self.beta else "output_text", "text": part})
            else:
                content.append({"type": "input_text", "text": part})
        return {"id": item.id, "object": "realtime.item", "type": "message",
                "status": item.status, "role": item.role, "content": content}

    def _session(self, settings: Settings) -> dict[str, Any]:
        common = {"id": self.session_id, "object": "realtime.session", "model": self.model,
                  "instructions": settings.instructions, "tools": [],
                  "temperature": settings.temperature}
        max_tokens = _max_tokens(settings)
        turn_detection = _turn_detection(settings.turn_detection)
        if self.beta:
            return {**common, "modalities": ["text"], "input_audio_format": "pcm16",
                    "turn_detection": turn_detection, "input_audio_transcription": None,
                    "max_response_output_tokens": max_tokens}
        return {**common, "type": "realtime", "output_modalities": ["text"],
                "max_output_tokens": max_tokens,
                "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": settings.input_rate_hz},
                    "turn_detection": turn_detection, "transcription": None}}}

    def _response(self, response: ResponseState) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": response.id, "object": "realtime.response", "status": response.status,
            "status_details": response.status_details,
            "output": [self.item(item) for item in response.output or ()],
            "conversation_id": response.conversation_id, "metadata": response.metadata,
            "usage": None if response.usage is None else _usage(response.usage),
        }
        max_tokens = _max_tokens(response.settings)
        if self.beta:
            return {**body, "modalities": ["text"], "max_output_tokens": max_tokens,
                    "temperature": response.settings.temperature}
        return {**body, "output_modalities": ["text"], "max_output_tokens": max_tokens}


def _event(kind: str, **fields: Any) -> Event:
    return {"event_id": new_id("event"), "type": kind, **fields}


def _at(response_id: str, item_id: str) -> dict[str, Any]:
    return {"response_id": response_id, "item_id": item_id, "output_index": 0,
            "content_index": 0}


def _ms(samples: int) -> int:
    return samples * 1000 // SERVICE_RATE_HZ


def _turn_detection(vad: ServerVad | None) -> dict[str, Any] | None:
    if vad is None:
        return None
    return {"type": "server_vad", "threshold": vad.threshold,
            "prefix_padding_ms": vad.prefix_padding_ms,
            "silence_duration_ms": vad.silence_duration_ms,
            "create_response": vad.create_response,
            "interrupt_response": vad.interrupt_response}


def _max_tokens(settings: Settings) -> int | str:
    return "inf" if settings.max_output_tokens is None else settings.max_output_tokens


def _usage(usage: pb.Usage) -> dict[str, Any]:
    text_tokens = usage.prompt_tokens - usage.audio_tokens - usage.image_tokens
    return {
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "input_token_details": {
            "text_tokens": text_tokens, "audio_tokens": usage.audio_tokens,
            "image_tokens": usage.image_tokens, "cached_tokens": usage.cached_prompt_tokens,
        },
        "output_token_details": {"text_tokens": usage.completion_tokens, "audio_tokens": 0},
    }
