"""Decoding of image and audio parts into arrays the encoders take.

Everything here runs on untrusted bytes, so every failure becomes InvalidMedia that
names the offending part.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError

from autoglm_common.bounds import quote
from inference_svc.errors import InvalidMedia

IMAGE_MIME_TYPES = {
    "image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"
}
# A decompression bomb guard: refuse images whose header claims more than this.
MAX_DECODED_PIXELS = 64_000_000
MAX_AUDIO_SECONDS = 120.0


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    original_size: tuple[int, int]
    reduced_under_pressure: bool = False  # resized under --pressure-max-pixels


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono at `sample_rate`
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def decode_image(data: bytes, mime_type: str, *, field: str, max_pixels: int) -> DecodedImage:
    """Decode PNG/JPEG/WebP bytes to RGB, downscaled to at most `max_pixels` pixels."""
    if not data:
        raise InvalidMedia(f"{field}: image data is empty", field=field)
    expected = None
    if mime_type:
        expected = IMAGE_MIME_TYPES.get(mime_type.lower())
        if expected is None:
            allowed = ", ".join(sorted(set(IMAGE_MIME_TYPES) - {"image/jpg"}))
            raise InvalidMedia(
                f"{field}: unsupported image MIME type {quote(mime_type)} (allowed: {allowed})",
                field=field,
            )
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            width, height = probe.size
            if width * height > MAX_DECODED_PIXELS:
                raise InvalidMedia(
                    f"{field}: image is {width}x{height}, over {MAX_DECODED_PIXELS} pixels",
                    field=field,
                )
            probe.load()
            image = probe.convert("RGB")
    except InvalidMedia:
        raise
    except UnidentifiedImageError as exc:
        raise InvalidMedia(f"{field}: not a PNG, JPEG or WebP image", field=field) from exc
    except Exception as exc:  # Pillow's parsers raise many types on hostile bytes
        # (SyntaxError for a broken PNG chunk, struct.error, EOFError...): all mean the
        # same to the client, and none may become INTERNAL
        raise InvalidMedia(f"{field}: cannot decode image: {quote(str(exc))}",
                           field=field) from exc
    if fmt not in {"PNG", "JPEG", "WEBP"}:
        raise InvalidMedia(f"{field}: unsupported image format {fmt}", field=field)
    if expected is not None and fmt != expected:
        raise InvalidMedia(
            f"{field}: MIME type {quote(mime_type)} does not match the data ({fmt})", field=field
        )
    return DecodedImage(image=fit_pixel_budget(image, max_pixels), original_size=(width, height))


def fit_pixel_budget(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale, keeping the aspect ratio, so that width*height <= max_pixels."""
    width, height = image.size
    if max_pixels <= 0 or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def decode_wav(data: bytes, *, field: str, target_rate: int) -> DecodedAudio:
    """Decode a RIFF/WAVE file (integer or float PCM) to mono float32 at target_rate."""
    if not data:
        raise InvalidMedia(f"{field}: audio data is empty", field=field)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as wav:
            if wav.format != "WAV" and wav.format != "WAVEX":
                raise InvalidMedia(f"{field}: audio is {wav.format}, expected WAV", field=field)
            if wav.frames / max(wav.samplerate, 1) > MAX_AUDIO_SECONDS:
                raise InvalidMedia(
                    f"{field}: audio longer than {MAX_AUDIO_SECONDS:.0f} s", field=field
                )
            samples = wav.read(dtype="float32", always_2d=True)
            rate = wav.samplerate
    except InvalidMedia:
        raise
    except Exception as exc:  # libsndfile and its wrapper raise many types on hostile bytes
        raise InvalidMedia(f"{field}: cannot decode WAV audio: {exc}", field=field) from exc
    return _finish_audio(samples, rate, field=field, target_rate=target_rate)


def decode_pcm(
    data: bytes,
    *,
    sample_rate: int,
    encoding: str,
    channels: int,
    field: str,
    target_rate: int,
) -> DecodedAudio:
    """Decode raw interleaved PCM (s16le or f32le) to mono float32 at target_rate."""
    if sample_rate < 1000 or sample_rate > 192_000:
        raise InvalidMedia(f"{field}: sample rate {sample_rate} Hz is out of range", field=field)
    channels = channels or 1
    if channels > 8:
        raise InvalidMedia(f"{field}: {channels} channels is more than 8", field=field)
    if encoding == "s16le":
        width, dtype, scale = 2, "<i2", 1 / 32768.0
    elif encoding == "f32le":
        width, dtype, scale = 4, "<f4", 1.0
    else:
        raise InvalidMedia(f"{field}: PCM encoding must be set (S16LE or F32LE)", field=field)
    if not data or len(data) % (width * channels):
        raise InvalidMedia(
            f"{field}: PCM data length {len(data)} is not a whole number of "
            f"{channels}-channel {encoding} frames",
            field=field,
        )
    if len(data) / (width * channels * sample_rate) > MAX_AUDIO_SECONDS:
        raise InvalidMedia(f"{field}: audio longer than {MAX_AUDIO_SECONDS:.0f} s", field=field)
    samples = np.frombuffer(data, dtype=dtype).astype(np.float32) * scale
    return _finish_audio(samples.reshape(-1, channels), sample_rate, field=field,
                         target_rate=target_rate)


def _finish_audio(
    frames: np.ndarray, rate: int, *, field: str, target_rate: int) -> DecodedAudio:
    """Check [frames, channels] samples, then mix to mono and resample to target_rate."""
    if not np.all(np.isfinite(frames)):
        raise InvalidMedia(f"{field}: audio contains NaN or infinite samples", field=field)
    peak = float(np.max(np.abs(frames), initial=0.0))
    if peak > 1.0:
        raise InvalidMedia(
            f"{field}: float audio samples must lie in [-1, 1]; the largest is {peak:.3g}",
            field=field,
        )
    mono = frames.mean(axis=1)
    samples = resample(mono, rate, target_rate) if len(mono) else mono
    if not len(samples):
        raise InvalidMedia(f"{field}: audio is {len(mono) * 1000 / rate:.1f} ms long; it "
                           f"needs at least one sample at {target_rate} Hz", field=field)
    return DecodedAudio(samples=samples, sample_rate=target_rate)


def resample(samples: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Linear-interpolation resampling; adequate for speech encoders' input rates."""
    if rate == target_rate:
        return samples.astype(np.float32, copy=False)
    count = max(1, round(len(samples) * target_rate / rate))
    positions = np.linspace(0, len(samples) - 1, count)
    return np.interp(positions, np.arange(len(samples)), samples).astype(np.float32)
