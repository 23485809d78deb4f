"""Decoding untrusted image and audio bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from inference_svc.errors import InvalidMedia
from inference_svc.model.media import decode_image, decode_pcm, decode_wav, fit_pixel_budget
from tests.conftest import png_bytes, wav_bytes


def encoded(fmt: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                           ("WEBP", "image/webp"), ("PNG", "")])
def test_supported_images_decode_to_rgb(fmt, mime):
    decoded = decode_image(encoded(fmt), mime, field="p", max_pixels=10_000)
    assert decoded.image.mode == "RGB"
    assert decoded.original_size == (40, 30)


@pytest.mark.parametrize(
    ("data", "mime", "fragment"),
    [
        (b"", "image/png", "empty"),
        (b"garbage", "image/png", "not a PNG, JPEG or WebP"),
        (encoded("GIF"), "", "unsupported image format GIF"),
        (encoded("PNG"), "image/jpeg", "does not match"),
        (encoded("PNG"), "image/bmp", "unsupported image MIME type"),
        (encoded("PNG")[:60], "image/png", "cannot decode"),
    ],
)
def test_bad_images_name_the_part(data, mime, fragment):
    with pytest.raises(InvalidMedia) as info:
        decode_image(data, mime, field="messages[0].parts[2].image", max_pixels=10_000)
    assert fragment in info.value.message
    assert info.value.message.startswith("messages[0].parts[2].image")


def test_pixel_budget_keeps_aspect_ratio():
    image = Image.new("RGB", (4000, 1000))
    fitted = fit_pixel_budget(image, 40_000)
    assert fitted.width * fitted.height <= 40_000
    assert fitted.width / fitted.height == pytest.approx(4.0, rel=0.02)
    assert fit_pixel_budget(image, 10**9) is image


def test_wav_is_resampled_to_mono_16k():
    decoded = decode_wav(wav_bytes(0.5, rate=8000), field="a", target_rate=16_000)
    assert decoded.sample_rate == 16_000
    assert decoded.seconds == pytest.approx(0.5, abs=0.01)
    stereo = io.BytesIO()
    soundfile.write(stereo, np.zeros((4410, 2), dtype="float32"), 44_100, format="WAV",
                    subtype="FLOAT")
    assert decode_wav(stereo.getvalue(), field="a", target_rate=16_000).seconds == (
        pytest.approx(0.1, abs=0.01))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"data": b"\0\0" * 100, "sample_rate": 50, "encoding": "s16le"}, "sample rate"),
        ({"data": b"\0" * 3, "sample_rate": 16000, "encoding": "s16le"}, "whole number"),
        ({"data": b"\0\0" * 100, "sample_rate": 16000, "encoding": ""}, "encoding"),
        ({"data": np.full(400, np.nan, "<f4").tobytes(), "sample_rate": 16000,
          "encoding": "f32le"}, "NaN"),
    ],
)
def test_bad_pcm_is_rejected(kwargs, fragment):
    with pytest.raises(InvalidMedia) as info:
        decode_pcm(channels=1, field="pcm", target_rate=16_000, **kwargs)
    assert fragment in info.value.message


def test_not_a_wav_is_rejected():
    with pytest.raises(InvalidMedia):
        decode_wav(png_bytes(), field="a", target_rate=16_000)
