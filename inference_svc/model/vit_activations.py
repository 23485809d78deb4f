"""The embedded default's ViT tower in numbers the plan needs without loading it: how its
patches merge into image tokens, and its activation peak for one image.

Kept apart from model/encoders.py, which builds the towers on transformers' modeling
code: `autoglm-plan` imports this, and importing that took ~2 s and torchao with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import ViTConfig

IMAGE_MERGE = 2  # 2x2 neighbouring patches become one image token
# Live tensors per encoder layer relative to its widest one (input, attention, MLP, output).
ACTIVATION_FACTOR = 4


def vit_activation_bytes(config: ViTConfig, element: int) -> int:
    """Peak activations of one image through the ViT (an estimate from its geometry: the
    widest per-layer tensor over every patch and the CLS token, times a working set)."""
    patches = (config.image_size // config.patch_size) ** 2 + 1
    return ACTIVATION_FACTOR * patches * config.intermediate_size * element
