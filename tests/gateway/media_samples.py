"""Small valid media files for requests: a PNG (Pillow) and a WAV (stdlib `wave`)."""

from __future__ import annotations

import base64
import io
import math
import struct
import wave

from PIL import Image


def png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color=(200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A 16-bit mono 440 Hz sine."""
    samples = b"".join(
        struct.pack("<h", int(12000 * math.sin(2 * math.pi * 440 * i / rate)))
        for i in range(int(seconds * rate))
    )
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples)
    return buffer.getvalue()
