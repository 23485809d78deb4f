"""A Realtime session's state in the service's terms: its settings, its conversation
items, and the GenerateRequest a response to them sends.

Audio is kept as the service takes it (16 kHz s16le), so that every later turn can send
the whole conversation again; with the session id the service reuses the cached state of
what it has seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from autoglm.inference.v1 import inference_service_pb2 as pb

from .errors import BadRequest

SERVICE_RATE_HZ = 16_000
Role = Literal["user", "assistant", "system"]
_ROLES: dict[str, pb.Role.ValueType] = {
    "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT, "system": pb.ROLE_SYSTEM,
}


@dataclass(frozen=True, slots=True)
class ServerVad:
    """OpenAI's `server_vad` turn detection, with OpenAI's defaults (see realtime_vad)."""

    threshold: float = 0.5  # 0..1, louder audio needed as it grows
    prefix_padding_ms: int = 300  # audio kept before the speech starts
    silence_duration_ms: int = 500  # the silence that ends the speech
    create_response: bool = True  # a response starts when the speech stops
    interrupt_response: bool = True  # speech starting cancels the response in progress


@dataclass(frozen=True, slots=True)
class Settings:
    """What shapes a response: the session's, or a response's overrides of them."""

    instructions: str = ""
    temperature: float | None = None  # None: the service's default
    max_output_tokens: int | None = None  # None: OpenAI's "inf", the service's default
    input_rate_hz: int = 24_000  # of appended audio; OpenAI's pcm16 is 24 kHz
    turn_detection: ServerVad | None = None  # None: the client commits


@dataclass(frozen=True, slots=True)
class Audio:
    """Speech, as the service takes it: 16 kHz mono s16le."""

    pcm: bytes

    @property
    def seconds(self) -> float:
        return len(self.pcm) / (2 * SERVICE_RATE_HZ)


Part = str | Audio


@dataclass(slots=True)
class Item:
    """One message of the conversation; an assistant item being generated is in_progress
    and takes its text when its response ends."""

    id: str
    role: Role
    parts: list[Part] = field(default_factory=list)
    status: Literal["completed", "incomplete", "in_progress"] = "completed"


class Conversation:
    """The items of one session, in order."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.version = 0  # counts additions and deletions

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def add(self, item: Item, previous_item_id: str | None = None) -> str | None:
        """Insert `item` after `previous_item_id` ("root": first; None: last); return the
        id of the item now before it."""
        if any(existing.id == item.id for existing in self.items):
            raise BadRequest(f"an item with id {item.id!r} already exists", param="item.id",
                             code="duplicate_item_id")
        if previous_item_id is None:
            position = len(self.items)
        elif previous_item_id == "root":
            position = 0
        else:
            position = self._index(previous_item_id, "previous_item_id") + 1
        self.items.insert(position, item)
        self.version += 1
        return self.items[position - 1].id if position else None

    def delete(self, item_id: str) -> None:
        del self.items[self._index(item_id, "item_id")]
        self.version += 1

    def _index(self, item_id: str, param: str) -> int:
        for index, item in enumerate(self.items):
            if item.id == item_id:
                return index
        raise BadRequest(f"no item with id {item_id!r} in the conversation", param=param,
                         code="item_not_found")


def generate_request(items: list[Item], settings: Settings, *,
                     session_id: str = "") -> pb.GenerateRequest:
    """The request that answers `items`: the instructions as the system message, then one
    message per run of items of the same role (the service itself joins streamed speech
    to a user message that ends the conversation, so a reply after a GenerateLive start
    and one after this request see the same messages)."""
    messages: list[pb.Message] = []
    if settings.instructions:
        messages.append(pb.Message(role=pb.ROLE_SYSTEM,
                                   parts=[pb.Part(text=settings.instructions)]))
    for item in items:
        parts = [_part(part) for part in item.parts if part != ""]
        if not parts:
            continue
        role = _ROLES[item.role]
        if messages and messages[-1].role == role:
            messages[-1].parts.extend(parts)
        else:
            messages.append(pb.Message(role=role, parts=parts))
    sampling = pb.SamplingParams()
    if settings.temperature is not None:
        sampling.temperature = settings.temperature
    if settings.max_output_tokens is not None:
        sampling.max_new_tokens = settings.max_output_tokens
    return pb.GenerateRequest(messages=messages, sampling=sampling, session_id=session_id)


def _part(part: Part) -> pb.Part:
    if isinstance(part, str):
        return pb.Part(text=part)
    return pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(
        data=part.pcm, sample_rate_hz=SERVICE_RATE_HZ, encoding=pb.PCM_ENCODING_S16LE,
        channels=1)))
