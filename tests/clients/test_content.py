"""Builders: plain Python values -> proto messages, with MIME sniffing."""

import struct
from pathlib import Path

import pytest
from autoglm_client import (
    InputError,
    audio,
    image,
    part,
    pcm_audio,
    prompt_conversation,
    sniff_image_mime,
    to_messages,
    user,
)

from autoglm.inference.v1 import inference_service_pb2 as pb

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 16
WEBP = b"RIFF" + struct.pack("<I", 20) + b"WEBPVP8 " + b"\x00" * 8
WAV = b"RIFF" + struct.pack("<I", 36) + b"WAVEfmt " + b"\x00" * 24


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG, "image/png"),
        (JPEG, "image/jpeg"),
        (WEBP, "image/webp"),
        (WAV, None),
        (b"GIF89a", None),
    ],
)
def test_sniff_image_mime(data: bytes, expected: str | None) -> None:
    assert sniff_image_mime(data) == expected


def test_image_from_path_reads_and_sniffs(tmp_path: Path) -> None:
    path = tmp_path / "shot.bin"
    path.write_bytes(JPEG)
    built = image(path)
    assert built.image.data == JPEG
    assert built.image.mime_type == "image/jpeg"


def test_image_rejects_unknown_format_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a PNG, JPEG or WebP"):
        image(b"GIF89a....")
    with pytest.raises(InputError, match="cannot read image file"):
        image(tmp_path / "missing.png")


def test_image_keeps_explicit_mime_but_refuses_unsupported_one() -> None:
    assert image(b"opaque", mime_type="image/png").image.mime_type == "image/png"
    with pytest.raises(InputError, match="unsupported image MIME type"):
        image(PNG, mime_type="image/gif")


def test_audio_accepts_wav_only() -> None:
    assert audio(WAV).audio.wav == WAV
    with pytest.raises(InputError, match="RIFF/WAVE"):
        audio(PNG)


def test_pcm_audio_sets_format() -> None:
    built = pcm_audio(b"\x00\x01" * 4, 16000, "s16le", channels=2).audio.pcm
    assert (built.sample_rate_hz, built.encoding, built.channels) == (
        16000,
        pb.PCM_ENCODING_S16LE,
        2,
    )
    with pytest.raises(InputError, match="unknown PCM encoding"):
        pcm_audio(b"", 16000, "u8")  # type: ignore[arg-type]


def test_part_dispatches_on_value_type(tmp_path: Path) -> None:
    wav_path = tmp_path / "clip.wav"
    wav_path.write_bytes(WAV)
    assert part("你好").text == "你好"
    assert part(PNG).image.mime_type == "image/png"
    assert part(wav_path).audio.wav == WAV
    with pytest.raises(InputError, match="neither"):
        part(b"plain bytes")


def test_user_message_keeps_part_order() -> None:
    message = user("look", PNG, "and listen", WAV)
    kinds = [p.WhichOneof("content") for p in message.parts]
    assert message.role == pb.ROLE_USER
    assert kinds == ["text", "image", "text", "audio"]


def test_to_messages_accepts_strings_mappings_and_protos() -> None:
    messages = to_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": ["what is this?", PNG]},
            pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text="a cat")]),
            "and now?",
        ]
    )
    assert [m.role for m in messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_USER,
    ]
    assert messages[1].parts[1].image.data == PNG
    assert to_messages("hi")[0].parts[0].text == "hi"
    assert to_messages({"role": "user", "content": PNG})[0].parts[0].image.data == PNG
    assert to_messages({"content": pb.Part(text="p")})[0].parts[0].text == "p"


def test_to_messages_rejects_unknown_role() -> None:
    with pytest.raises(InputError, match="unknown role"):
        to_messages({"role": "tool", "content": "x"})


def test_prompt_conversation_puts_system_first_and_media_after_text() -> None:
    system_message, turn = prompt_conversation(
        "describe", images=[PNG], audio_clips=[WAV], system_prompt="be brief"
    )
    assert system_message.parts[0].text == "be brief"
    assert [p.WhichOneof("content") for p in turn.parts] == ["text", "image", "audio"]
    assert len(prompt_conversation("hi")) == 1
