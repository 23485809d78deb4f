"""Decoding untrusted image and audio bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
from PIL import Image

from inference_svc.errors import InvalidMedia
from inference_svc.model.inputs.media import decode_image, decode_pcm, decode_wav, fit_pixel_budget
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


def float_wav(samples: np.ndarray, subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, 16_000, format="WAV", subtype=subtype)
    return buffer.getvalue()


def f32le(*values: float, count: int = 1600) -> bytes:
    samples = np.zeros(count, "<f4")
    samples[: len(values)] = values
    return samples.tobytes()


@pytest.mark.parametrize(
    ("decode", "fragment"),
    [
        (lambda: decode_pcm(f32le(0.5, 1.5), sample_rate=16000, encoding="f32le", channels=1,
                            field="p", target_rate=16_000), "[-1, 1]"),
        (lambda: decode_pcm(f32le(3e38), sample_rate=16000, encoding="f32le", channels=2,
                            field="p", target_rate=16_000), "[-1, 1]"),
        (lambda: decode_pcm(f32le(-np.inf), sample_rate=16000, encoding="f32le", channels=1,
                            field="p", target_rate=16_000), "infinite"),
        (lambda: decode_wav(float_wav(np.full(1600, 2.0, "float32")), field="p",
                            target_rate=16_000), "[-1, 1]"),
        (lambda: decode_wav(float_wav(np.full(1600, 3e38, "float32")), field="p",
                            target_rate=16_000), "[-1, 1]"),
        (lambda: decode_wav(float_wav(np.full(1600, 1e300), "DOUBLE"), field="p",
                            target_rate=16_000), "infinite"),
    ],
)
def test_float_samples_must_be_finite_and_within_unit_range(decode, fragment):
    with pytest.raises(InvalidMedia) as info:
        decode()
    assert fragment in info.value.message
    assert info.value.field == "p"


def test_float_samples_at_full_scale_are_accepted():
    decoded = decode_pcm(f32le(1.0, -1.0), sample_rate=16000, encoding="f32le", channels=1,
                         field="p", target_rate=16_000)
    assert decoded.samples.max() == 1.0


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
def test_one_sample_of_audio_decodes(rate):
    decoded = decode_pcm(np.zeros(1, "<i2").tobytes(), sample_rate=rate, encoding="s16le",
                         channels=1, field="p", target_rate=16_000)
    assert len(decoded.samples) >= 1


def test_wav_without_frames_is_rejected():
    with pytest.raises(InvalidMedia) as info:
        decode_wav(wav_bytes(0.0), field="a", target_rate=16_000)
    assert "ms long" in info.value.message and "at least one sample" in info.value.message


def test_any_clip_of_one_sample_or_more_encodes_to_its_tokens():
    from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

    from inference_svc.model.encoders import AudioEncoder
    from inference_svc.model.inputs.media import DecodedAudio

    config = Wav2Vec2ConformerConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_depthwise_kernel_size=3, conv_dim=(8,) * 7, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
    )
    encoder = AudioEncoder(Wav2Vec2ConformerModel(config), 8).eval()
    # a token is 80 ms (1280 samples); chunks are windows padded with zeros
    for length, tokens in [(1, 1), (1280, 1), (1281, 2), (10240 + 5, 9)]:
        clip = DecodedAudio(np.zeros(length, "float32"), 16_000)
        assert encoder.encode([clip])[0].shape == (tokens, 8)
