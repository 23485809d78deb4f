"""Builders that turn plain Python values into request messages.

Text is `str`; images and audio are `pathlib.Path` or `bytes`, recognised by their magic
bytes (PNG, JPEG, WebP; RIFF/WAVE). A ready-made proto `Part` or `Message` passes through.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.errors import InputError

BinarySource = bytes | bytearray | memoryview | os.PathLike[str]
PartValue = str | BinarySource | pb.Part | pb.Image | pb.Audio
RoleName = Literal["system", "user", "assistant"]
MessageValue = pb.Message | Mapping[str, object] | str
Conversation = MessageValue | Iterable[MessageValue]

IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/webp")
_ROLES: dict[str, pb.Role.ValueType] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
}
PCM_ENCODINGS: dict[str, pb.PcmEncoding.ValueType] = {
    "s16le": pb.PCM_ENCODING_S16LE,
    "f32le": pb.PCM_ENCODING_F32LE,
}


def sniff_image_mime(data: bytes) -> str | None:
    """The MIME type of a PNG, JPEG or WebP file from its first bytes, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def is_wav(data: bytes) -> bool:
    """True when `data` starts like a RIFF/WAVE file."""
    return data[:4] == b"RIFF" and data[8:12] == b"WAVE"


def text(value: str) -> pb.Part:
    """A text part."""
    return pb.Part(text=value)


def image(source: BinarySource, mime_type: str | None = None) -> pb.Part:
    """An image part from a file path or encoded bytes; the MIME type is sniffed if not given."""
    data = _read(source, "image")
    mime_type = mime_type or sniff_image_mime(data)
    if mime_type is None:
        raise InputError(f"{_describe(source)} is not a PNG, JPEG or WebP image")
    if mime_type not in IMAGE_MIME_TYPES:
        raise InputError(
            f"unsupported image MIME type {mime_type!r}; use one of {IMAGE_MIME_TYPES}"
        )
    return pb.Part(image=pb.Image(data=data, mime_type=mime_type))


def audio(source: BinarySource) -> pb.Part:
    """An audio part from a WAV file path or WAV bytes."""
    data = _read(source, "audio")
    if not is_wav(data):
        raise InputError(f"{_describe(source)} is not a RIFF/WAVE file")
    return pb.Part(audio=pb.Audio(wav=data))


def pcm_audio(
    samples: bytes,
    sample_rate_hz: int,
    encoding: Literal["s16le", "f32le"] = "s16le",
    channels: int = 1,
) -> pb.Part:
    """An audio part from raw interleaved PCM samples."""
    if encoding not in PCM_ENCODINGS:
        raise InputError(f"unknown PCM encoding {encoding!r}; use one of {tuple(PCM_ENCODINGS)}")
    pcm = pb.PcmAudio(
        data=samples,
        sample_rate_hz=sample_rate_hz,
        encoding=PCM_ENCODINGS[encoding],
        channels=channels,
    )
    return pb.Part(audio=pb.Audio(pcm=pcm))


def part(value: PartValue) -> pb.Part:
    """One part from a plain value: `str` is text, paths and bytes are sniffed."""
    if isinstance(value, pb.Part):
        return value
    if isinstance(value, str):
        return text(value)
    if isinstance(value, pb.Image):
        return pb.Part(image=value)
    if isinstance(value, pb.Audio):
        return pb.Part(audio=value)
    data = _read(value, "media")
    if is_wav(data):
        return pb.Part(audio=pb.Audio(wav=data))
    if sniff_image_mime(data):
        return image(data)
    raise InputError(f"{_describe(value)} is neither a PNG/JPEG/WebP image nor a WAV file")


def message(role: RoleName, *parts: PartValue) -> pb.Message:
    """A message of the given role whose parts are built with `part`."""
    if role not in _ROLES:
        raise InputError(f"unknown role {role!r}; use one of {tuple(_ROLES)}")
    return pb.Message(role=_ROLES[role], parts=[part(value) for value in parts])


def system(*parts: PartValue) -> pb.Message:
    """A system message."""
    return message("system", *parts)


def user(*parts: PartValue) -> pb.Message:
    """A user message, for example `user("what is this?", Path("shot.png"))`."""
    return message("user", *parts)


def assistant(*parts: PartValue) -> pb.Message:
    """An earlier assistant reply."""
    return message("assistant", *parts)


def to_messages(conversation: Conversation) -> list[pb.Message]:
    """Normalise a conversation: a prompt string, a message, or a sequence of messages.

    Messages may be protos or mappings `{"role": "user", "content": "hi"}` whose content is
    a value or a list of values accepted by `part`.
    """
    if isinstance(conversation, str | pb.Message | Mapping):
        conversation = [conversation]
    return [_to_message(item) for item in conversation]


def _to_message(item: MessageValue) -> pb.Message:
    if isinstance(item, pb.Message):
        return item
    if isinstance(item, str):
        return user(item)
    if isinstance(item, Mapping):
        content = item.get("content", ())
        single = str | bytes | bytearray | memoryview | os.PathLike | pb.Part | pb.Image | pb.Audio
        values = [content] if isinstance(content, single) else list(content)
        return message(item.get("role", "user"), *values)
    raise InputError(f"cannot build a message from {type(item).__name__}")


def _read(source: BinarySource, kind: str) -> bytes:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    if isinstance(source, os.PathLike):
        path = Path(source)
        try:
            return path.read_bytes()
        except OSError as error:
            raise InputError(f"cannot read {kind} file {path}: {error.strerror}") from error
    raise InputError(f"expected a path or bytes for {kind}, got {type(source).__name__}")


def _describe(source: object) -> str:
    if isinstance(source, os.PathLike):
        return str(Path(source))
    return "the given bytes"


def prompt_conversation(
    prompt: str | None,
    *,
    images: Iterable[BinarySource] = (),
    audio_clips: Iterable[BinarySource] = (),
    system_prompt: str | None = None,
) -> list[pb.Message]:
    """A one-turn conversation: optional system text, then the prompt with its media. With
    no prompt and no media there is no user turn (GenerateLive's speech becomes one)."""
    media = [image(source) for source in images] + [audio(source) for source in audio_clips]
    parts = media if prompt is None else [text(prompt), *media]
    turns = [pb.Message(role=pb.ROLE_USER, parts=parts)] if parts else []
    return [system(system_prompt), *turns] if system_prompt else turns
