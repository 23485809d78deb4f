"""GLM-4.1V's image geometry and the vision tower's activation estimate.

Geometry: the image processor resizes each image with GLM-4.1V's own rule (transformers'
`smart_resize`: both sides rounded to multiples of patch x merge, 28 px, and scaled so
that temporal_patch_size x height x width stays within [min_pixels, max_pixels]; a still
image counts as two temporal frames), then cuts it into 14-px patches. One image token
is one 2x2 group of patches. All of it is arithmetic on the image's size, so the token
count and the activation estimate are known before the tower runs and before admission.

Activations: per block the tower keeps the residual stream and computes qkv, attention
over all patches of one image at a time, and a gated MLP of width `out_hidden_size`. With
eager attention (and SDPA's math backend) the scores are materialised, heads x patches^2,
in the model's dtype and again in float32 for the softmax: for a 1080x2400 screenshot at
max_pixels 5,000,000 (12,432 patches, 12 heads) that is 7.4 GB per layer in bf16, which
is why screenshots are what makes peer servers run out of memory. SDPA's fused kernels
(flash on CPU, flash or memory-efficient on CUDA) keep no such matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# GLM-4.1V-9B-Thinking's preprocessor_config.json (AutoGLM-Phone-9B has the same
# architecture and processor): size.shortest_edge and size.longest_edge.
GLM4V_MIN_PIXELS = 12_544  # 112 * 112
GLM4V_MAX_PIXELS = 9_633_792  # 28 * 28 * 12288
# Open-AutoGLM's vLLM command: --mm_processor_kwargs '{"max_pixels": 5000000}'
DEPLOYMENT_MAX_PIXELS = 5_000_000
# Fused attention kernels keep their working set in tiles, not per score.
QUADRATIC_IMPLEMENTATIONS = {"eager"}


@dataclass(frozen=True)
class VisionGeometry:
    """What the image processor and the tower's shape say about one image's cost."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = GLM4V_MIN_PIXELS
    max_pixels: int = GLM4V_MAX_PIXELS

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def resized(self, width: int, height: int, *, max_pixels: int | None = None
                ) -> tuple[int, int]:
        """(width, height) after GLM-4.1V's resize rule; `max_pixels` lowers the budget
        (it counts the two temporal frames, as the processor's own max_pixels does)."""
        budget = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        h, w = smart_resize(self.temporal_patch_size, height, width,
                            temporal_factor=self.temporal_patch_size, factor=self.factor,
                            min_pixels=min(self.min_pixels, budget), max_pixels=budget)
        return w, h

    def grid(self, width: int, height: int, *, max_pixels: int | None = None
             ) -> tuple[int, int, int]:
        """(t, h, w) in patches, as the processor's image_grid_thw."""
        w, h = self.resized(width, height, max_pixels=max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2


def smart_resize(num_frames: int, height: int, width: int, *, temporal_factor: int,
                 factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """GLM-4.1V's resize rule, as transformers' Glm4vImageProcessor applies it
    (transformers.models.glm4v.image_processing_glm4v.smart_resize): (height, width)."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class TowerShape:
    """The widths of a GLM-4.1V vision tower that its activations scale with."""

    hidden: int
    heads: int
    mlp: int  # the blocks' gated MLP width (Glm4VisionMlp uses out_hidden_size)
    merger: int  # the patch merger's MLP width (intermediate_size)
    out_hidden: int
    patch_input: int  # channels * temporal * patch * patch
    merge_units: int  # patches per image token
    element: int  # bytes per element of the tower's dtype
    attention: str  # the tower's attention implementation

    @classmethod
    def of(cls, vision_config, dtype: torch.dtype) -> TowerShape:
        c = vision_config
        return cls(
            hidden=int(c.hidden_size), heads=int(c.num_heads), mlp=int(c.out_hidden_size),
            merger=int(c.intermediate_size), out_hidden=int(c.out_hidden_size),
            patch_input=int(c.in_channels) * int(c.temporal_patch_size) * int(c.patch_size) ** 2,
            merge_units=int(c.spatial_merge_size) ** 2,
            element=torch.tensor([], dtype=dtype).element_size(),
            attention=str(getattr(c, "_attn_implementation", None) or "eager"),
        )


def activation_bytes(shape: TowerShape, patches: list[int]) -> int:
    """Peak bytes of the tower's activations for one forward over these images (patch
    counts), all images encoded together as the model does.

    Linear terms (every image's patches at once): the float32 pixel patches and their
    copy in the tower's dtype, the residual stream, and the larger of one block's
    attention projections (qkv, rotated q and k, output) and its MLP (gate, up, their
    product); then the merger over the merged tokens. The quadratic term (eager
    attention only, one image at a time): heads x patches^2 scores in the tower's dtype
    plus their float32 softmax.
    """
    if not patches:
        return 0
    e = shape.element
    n = sum(patches)
    pixels = n * shape.patch_input * (4 + e)
    residual = 2 * n * shape.hidden * e
    attention = n * shape.hidden * (3 + 2 + 1) * e
    mlp = n * shape.mlp * 3 * e
    merged = (n // shape.merge_units) * (shape.hidden * shape.merge_units
                                         + 3 * shape.merger + shape.out_hidden) * e
    linear = pixels + residual + max(attention, mlp, merged)
    quadratic = 0
    if shape.attention in QUADRATIC_IMPLEMENTATIONS:
        quadratic = shape.heads * max(patches) ** 2 * (e + 4)
    return linear + quadratic
