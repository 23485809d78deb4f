"""A checkpoint's tensors by module, as names and shapes: from its safetensors headers,
or, for a GLM-4.1V checkpoint without weight files, computed from its config.json the way
transformers' Glm4vForConditionalGeneration builds them (a test checks the two agree).

A tensor's role says how weight quantization treats it: `linear` (a Linear's weight
matrix), `lm_head`, `embedding` (the token embedding) or `other` (biases, norms,
convolutions, position tables), and `layer` which decoder layer it belongs to, so the
decoder can be split.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from inference_svc.model.checkpoints.bundle import Manifest
from inference_svc.model.checkpoints.glm4v_checkpoint import VISION_PREFIXES
from inference_svc.model.checkpoints.glm4v_config import read_glm4v_config
from inference_svc.model.checkpoints.headers import safetensors_header
from inference_svc.model.checkpoints.model_dir import ModelKind, model_kind

LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def role(self) -> str:
        if len(self.shape) != 2 or not self.name.endswith("weight"):
            return "other"
        if self.name.endswith("lm_head.weight"):
            return "lm_head"
        if "embed_tokens" in self.name:
            return "embedding"
        return "linear"

    @property
    def layer(self) -> int | None:
        match = LAYER.search(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class TensorTable:
    modules: dict[str, list[TensorSpec]]  # "decoder", "vision", ("audio")
    source: str  # "safetensors headers" or "config.json"

    def parameters(self) -> dict[str, int]:
        return {name: sum(t.numel for t in tensors) for name, tensors in self.modules.items()}


def header_tensors(files: list[Path]) -> list[TensorSpec]:
    return [TensorSpec(name, tuple(info["shape"]))
            for path in files for name, info in safetensors_header(path).items()]


def glm4v_tensors(config) -> dict[str, list[TensorSpec]]:
    """Glm4vForConditionalGeneration's parameters from a Glm4vConfig: names and shapes."""
    text, vision = config.text_config, config.vision_config
    hidden, vocab = int(text.hidden_size), int(text.vocab_size)
    head_dim = hidden // int(text.num_attention_heads)  # Glm4vTextAttention's own rule
    q_width = int(text.num_attention_heads) * head_dim
    kv_width = int(text.num_key_value_heads) * head_dim
    mlp = int(text.intermediate_size)
    decoder = [TensorSpec("model.language_model.embed_tokens.weight", (vocab, hidden))]
    for i in range(int(text.num_hidden_layers)):
        p = f"model.language_model.layers.{i}."
        decoder += [
            TensorSpec(p + "self_attn.q_proj.weight", (q_width, hidden)),
            TensorSpec(p + "self_attn.q_proj.bias", (q_width,)),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_width, hidden)),
            TensorSpec(p + "self_attn.k_proj.bias", (kv_width,)),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_width, hidden)),
            TensorSpec(p + "self_attn.v_proj.bias", (kv_width,)),
            TensorSpec(p + "self_attn.o_proj.weight", (hidden, q_width)),
            TensorSpec(p + "mlp.gate_up_proj.weight", (2 * mlp, hidden)),
            TensorSpec(p + "mlp.down_proj.weight", (hidden, mlp)),
            *(TensorSpec(p + f"{norm}.weight", (hidden,)) for norm in (
                "input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                "post_mlp_layernorm")),
        ]
    decoder.append(TensorSpec("model.language_model.norm.weight", (hidden,)))
    if not config.tie_word_embeddings:
        decoder.append(TensorSpec("lm_head.weight", (vocab, hidden)))
    return {"decoder": decoder, "vision": _glm4v_vision_tensors(vision)}


def _glm4v_vision_tensors(c) -> list[TensorSpec]:
    width, out, merger = int(c.hidden_size), int(c.out_hidden_size), int(c.intermediate_size)
    patch, merge = int(c.patch_size), int(c.spatial_merge_size)
    v = "model.visual."
    tensors = [
        TensorSpec(v + "embeddings.position_embedding.weight",
                   ((int(c.image_size) // patch) ** 2, width)),
        TensorSpec(v + "patch_embed.proj.weight",
                   (width, int(c.in_channels), int(c.temporal_patch_size), patch, patch)),
        TensorSpec(v + "patch_embed.proj.bias", (width,)),
    ]
    for j in range(int(c.depth)):
        b = f"{v}blocks.{j}."
        tensors += [
            TensorSpec(b + "norm1.weight", (width,)),
            TensorSpec(b + "norm2.weight", (width,)),
            TensorSpec(b + "attn.qkv.weight", (3 * width, width)),
            *([TensorSpec(b + "attn.qkv.bias", (3 * width,))] if c.attention_bias else []),
            TensorSpec(b + "attn.proj.weight", (width, width)),
            TensorSpec(b + "mlp.gate_proj.weight", (out, width)),  # the blocks' MLP is
            TensorSpec(b + "mlp.up_proj.weight", (out, width)),  # out_hidden_size wide
            TensorSpec(b + "mlp.down_proj.weight", (width, out)),
        ]
    return [
        *tensors,
        TensorSpec(v + "post_conv_layernorm.weight", (width,)),
        TensorSpec(v + "downsample.weight", (out, width, merge, merge)),
        TensorSpec(v + "downsample.bias", (out,)),
        TensorSpec(v + "merger.proj.weight", (out, out)),
        TensorSpec(v + "merger.post_projection_norm.weight", (out,)),
        TensorSpec(v + "merger.post_projection_norm.bias", (out,)),
        TensorSpec(v + "merger.gate_proj.weight", (merger, out)),
        TensorSpec(v + "merger.up_proj.weight", (merger, out)),
        TensorSpec(v + "merger.down_proj.weight", (out, merger)),
        TensorSpec(v + "post_layernorm.weight", (width,)),
    ]


def tensor_table(directory: Path) -> TensorTable:
    """The checkpoint's tensors per module: headers where weight files exist, else (a
    GLM-4.1V checkpoint) its config."""
    if model_kind(directory) is ModelKind.MODULAR:
        manifest = Manifest.read(directory)
        return TensorTable({
            name: header_tensors(sorted((directory / entry.path).glob("*.safetensors")))
            for name, entry in manifest.modules.items()}, "safetensors headers")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return TensorTable(glm4v_tensors(read_glm4v_config(directory).config), "config.json")
    tensors = header_tensors(files)
    vision = [t for t in tensors if t.name.startswith(VISION_PREFIXES)]
    decoder = [t for t in tensors if not t.name.startswith(VISION_PREFIXES)]
    return TensorTable({"decoder": decoder, "vision": vision}, "safetensors headers")
