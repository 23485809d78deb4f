"""The GLM-4.1V vision activation estimate against one measured tower forward.

    PYTHONPATH=$PWD:$PWD/clients/python .venv/bin/python tests/bench/vision_activations.py \\
        CHECKPOINT {sdpa|eager} WIDTH HEIGHT MAX_PIXELS [DEVICE]

Run one process per case: on CPU the peak is the process's resident memory sampled during
the forward (plus the pixel patches, which exist before it), on CUDA
`torch.cuda.max_memory_allocated` over the forward. Prints one JSON line.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image

from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.glm4v_vision import TowerShape
from inference_svc.types import ChatMessage, ImagePart, TextPart


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(checkpoint: Path, attention: str, width: int, height: int, max_pixels: int,
            device: str) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = Glm4vModel(checkpoint, device=device, dtype=dtype)
    model._vision_config._attn_implementation = attention
    model._tower_shape = TowerShape.of(model._vision_config, dtype)
    buffer = io.BytesIO()
    Image.effect_noise((width, height), 60).convert("RGB").save(buffer, "PNG")
    messages = [ChatMessage("user", [ImagePart(buffer.getvalue(), "image/png", "image"),
                                     TextPart("hi")])]
    media = model.decode_media(messages, max_pixels=max_pixels)
    plan = model.plan(messages, media, enable_thinking=False)
    pixels = sum(p.numel() * p.element_size() for p in media.pixel_values)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model._uncached_image_features(plan, media, 0)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - base + pixels
    else:
        base = resident_bytes()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], resident_bytes())
                time.sleep(0.0005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        model._uncached_image_features(plan, media, 0)
        done.set()
        sampler.join()
        measured = peak[0] - base + pixels
    return {"attention": attention, "image": f"{width}x{height}", "max_pixels": max_pixels,
            "patches": sum(t * h * w for t, h, w in media.grids),
            "image_tokens": plan.image_tokens, "estimate_bytes": model.activation_bytes(media),
            "measured_bytes": measured, "device": device}


if __name__ == "__main__":
    checkpoint, attention, width, height, max_pixels, *rest = sys.argv[1:]
    torch.set_num_threads(1)
    result = measure(Path(checkpoint), attention, int(width), int(height), int(max_pixels),
                     rest[0] if rest else "cpu")
    sys.stdout.write(json.dumps(result) + "\n")
