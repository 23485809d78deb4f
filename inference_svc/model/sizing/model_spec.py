"""What a plan needs to know of a checkpoint, read from its files without loading weights:
its tensors, its KV shape and context, and what one phone screenshot costs its vision
encoder (image tokens, peak activations)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ViTConfig

from inference_svc.model.checkpoints.bundle import Manifest
from inference_svc.model.checkpoints.glm4v_checkpoint import glm4v_manifest
from inference_svc.model.checkpoints.glm4v_config import read_glm4v_config
from inference_svc.model.checkpoints.model_dir import ModelKind, model_kind
from inference_svc.model.glm4v_vision import (
    DEPLOYMENT_MAX_PIXELS,
    TowerShape,
    VisionGeometry,
    activation_bytes,
)
from inference_svc.model.sizing.tensors import TensorTable, tensor_table
from inference_svc.model.sizing.weights import FULL_ELEMENT
from inference_svc.model.vit_activations import IMAGE_MERGE, vit_activation_bytes

TORCH_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The service loads GLM-4.1V with transformers' default attention, SDPA, whose fused
# kernels keep no patches x patches score matrix (glm4v_vision.activation_bytes).
SERVICE_ATTENTION = "sdpa"


@dataclass(frozen=True)
class KvShape:
    layers: int
    kv_heads: int
    head_dim: int

    def bytes_per_token_per_layer(self, element: int) -> int:
        return 2 * self.kv_heads * self.head_dim * element  # K and V

    def bytes_per_token(self, element: int) -> int:
        return self.layers * self.bytes_per_token_per_layer(element)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str
    tensors: TensorTable
    full: str  # the serving dtype's precision: bf16, fp16 or fp32
    kv: KvShape
    context: int  # the model's longest context (max_position_embeddings)
    screenshot: tuple[int, int]
    image_tokens: int  # per screenshot
    vision_activation_bytes: int  # the vision encoder's peak for one screenshot


def text_shape(config: dict) -> tuple[KvShape, int]:
    """KV shape and context from a decoder's config.json (either GLM-4.1V layout too)."""
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    head_dim = text.get("head_dim") or int(text["hidden_size"]) // heads
    shape = KvShape(int(text["num_hidden_layers"]),
                    int(text.get("num_key_value_heads") or heads), int(head_dim))
    return shape, int(text.get("max_position_embeddings", 2048))


def read_model(directory: Path, *, full: str, screenshot: tuple[int, int] = (1080, 2400),
               max_pixels: int | None = None) -> ModelSpec:
    """`max_pixels`: the service's --max-pixels (default: the model's own default)."""
    kind = model_kind(directory)
    element = FULL_ELEMENT[full]
    if kind is ModelKind.MODULAR:
        manifest = Manifest.read(directory)
        decoder = json.loads(
            (directory / manifest.modules["decoder"].path / "config.json").read_text())
        kv, context = text_shape(decoder)
        image_tokens = activations = 0
        if "vision" in manifest.modules:
            vit = ViTConfig.from_pretrained(directory / manifest.modules["vision"].path)
            image_tokens = (vit.image_size // vit.patch_size // IMAGE_MERGE) ** 2
            activations = vit_activation_bytes(vit, element)
        name = manifest.name
    else:
        config = read_glm4v_config(directory).config
        text = config.text_config
        kv = KvShape(int(text.num_hidden_layers), int(text.num_key_value_heads),
                     int(text.hidden_size) // int(text.num_attention_heads))  # GLM's rule
        context = int(text.max_position_embeddings)
        geometry = glm4v_geometry(directory)
        grid = geometry.grid(*screenshot, max_pixels=max_pixels or DEPLOYMENT_MAX_PIXELS)
        image_tokens = geometry.image_tokens(grid)
        tower = dataclasses.replace(TowerShape.of(config.vision_config, TORCH_DTYPE[full]),
                                    attention=SERVICE_ATTENTION)
        activations = activation_bytes(tower, [grid[0] * grid[1] * grid[2]])
        name = glm4v_manifest(directory).name
    return ModelSpec(name=name, kind=kind, tensors=tensor_table(directory), full=full, kv=kv,
                     context=context, screenshot=screenshot, image_tokens=image_tokens,
                     vision_activation_bytes=activations)


def glm4v_geometry(directory: Path) -> VisionGeometry:
    """GLM-4.1V's resize rule with the checkpoint's processor limits."""
    processor_file = directory / "preprocessor_config.json"
    if not processor_file.is_file():
        return VisionGeometry()  # GLM-4.1V-9B-Thinking's processor
    processor = json.loads(processor_file.read_text())
    size = processor.get("size") or {}
    default = VisionGeometry()
    return VisionGeometry(
        patch_size=int(processor.get("patch_size", default.patch_size)),
        merge_size=int(processor.get("merge_size", default.merge_size)),
        temporal_patch_size=int(processor.get("temporal_patch_size",
                                              default.temporal_patch_size)),
        min_pixels=int(size.get("shortest_edge", default.min_pixels)),
        max_pixels=int(size.get("longest_edge", default.max_pixels)),
    )
