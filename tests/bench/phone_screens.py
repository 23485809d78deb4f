"""Synthetic phone screenshots: full resolution, deterministic, about 1 MB as PNG.

A real 1080x2400 screenshot is about 1.2 MB as PNG. A flat image would compress to a
few kB and make the upload, the base64 decode and the PNG decode look free, so these are
a colour gradient (the background) under 3-pixel blocks of noise (text and icons), which
PNG compresses about as well as a real screen.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

SCREEN_SIZE = (1080, 2400)  # width, height of the phone agent's screenshots
_BLOCK = 3  # pixels per noise block
_NOISE = 16  # most a block differs from the gradient, per channel


def screenshot_png(seed: int, size: tuple[int, int] = SCREEN_SIZE) -> bytes:
    """The same PNG for the same seed; another seed gives another image (other KV)."""
    width, height = size
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, height)[:, None]
    x = np.linspace(0.0, 1.0, width)[None, :]
    tint = rng.uniform(0, 60, size=3)
    background = np.stack(np.broadcast_arrays(tint[0] + 150 * y + 40 * x,
                                              tint[1] + 100 + 60 * x + 0 * y,
                                              tint[2] + 190 - 100 * y + 0 * x), axis=-1)
    blocks = rng.integers(-_NOISE, _NOISE + 1,
                          size=(-(-height // _BLOCK), -(-width // _BLOCK), 3))
    noise = blocks.repeat(_BLOCK, axis=0).repeat(_BLOCK, axis=1)[:height, :width]
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    """How the agent sends a screenshot: an OpenAI `image_url` data URL."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
