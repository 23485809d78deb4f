"""Decoder passes on the host without transformers' per-layer plumbing.

On a CPU one decode row of the embedded default is ~22 ms of matmuls (its fp32 weights
read once) and ~2,000 small operations. transformers' layers wrap those operations in
keyword plumbing, deprecation shims, an attention-function lookup, rope and mask helpers
and output objects, and on two cores that wrapping costs about a tenth of a decode step
(one row at 200 keys: 36.9 -> 33.3 ms in fp32, 30.2 -> 25.9 ms in int8), the same few
milliseconds on every pass. Here the same arithmetic runs on the same modules' weights in
the same order: the layers' own projections (whatever precision they hold), norms'
weights, rotary embedding, rope function and MLP, and the step's own KV write and
attention (a decode step's SDPA called as transformers' sdpa attention calls it for one
new token; a pack of segments' `SegmentStep.attend`, as the registered attention
function calls it); the logits and the KV written are bitwise transformers'. vLLM, SGLang
and nano-vllm own their model forwards for the same reason.

It serves the decoders the service runs (`ARCHITECTURES`: the embedded default's Llama,
GLM and GLM-4.1V's text decoder), wholly on the host and with no module hooks (a hook,
accelerate's placement among them, would be skipped). transformers' forward stays the
reference and the path for everything else: other architectures, decoders on a GPU
(where a captured CUDA graph removes the same cost) or split over devices.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_hooks
from transformers import Glm4vForConditionalGeneration, GlmForCausalLM, LlamaForCausalLM
from transformers.models.glm import modeling_glm
from transformers.models.glm4v import modeling_glm4v

from inference_svc.model.host_linears import sibling_outputs
from inference_svc.model.paged.kv_pool import PagedStep
from inference_svc.model.paged.segment_step import SegmentStep

# a layer's attention of its queries over the new keys and values and what the pool holds
Attend = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Rope = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                tuple[torch.Tensor, torch.Tensor]]


def _rotate_halves(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's rope (the halves rotated), its arithmetic without its hub-kernel wrapper."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return query * cos + rotate(query) * sin, key * cos + rotate(key) * sin


@dataclass(frozen=True)
class Architecture:
    """Where a decoder keeps its text model, and what its layers do differently."""

    text_model: Callable[[nn.Module], nn.Module]  # has .layers, .norm, .rotary_emb
    rope: Rope  # applied to [batch, heads, tokens, head_dim] with the rotary cos, sin
    rope_axes: int  # position rows the rotary embedding takes (3: GLM-4.1V's mrope)
    sandwich_norms: bool  # GLM-4's norms after attention and after the MLP
    gate_up_proj: bool  # GLM's MLP: gate and up in one projection (Llama's: two)


ARCHITECTURES: dict[type, Architecture] = {
    LlamaForCausalLM: Architecture(lambda d: d.model, _rotate_halves, 1, False, False),
    GlmForCausalLM: Architecture(lambda d: d.model, modeling_glm.apply_rotary_pos_emb, 1,
                                 False, True),
    Glm4vForConditionalGeneration: Architecture(
        lambda d: d.model.language_model, modeling_glm4v.apply_rotary_pos_emb, 3, True, True),
}


class HostDecoders:
    """Which decoders take the lean host passes: the architecture and placement are looked
    at once per loaded decoder (one reloaded after an offload is a new object), hooks at
    every step (a fault injector or a profiler may add one at any time)."""

    def __init__(self) -> None:
        self._decoder: weakref.ref | None = None
        self._architecture: Architecture | None = None
        self._modules: list[weakref.ref] = []

    def architecture_for(self, decoder: nn.Module) -> Architecture | None:
        """`decoder`'s architecture where this pass of it can run lean, else None."""
        if self._decoder is None or self._decoder() is not decoder:
            self._decoder = weakref.ref(decoder)
            self._architecture = _servable(decoder)
            self._modules = [weakref.ref(m) for m in decoder.modules()]
        if self._architecture is None or _hooked(self._modules):
            return None
        return self._architecture


def _servable(decoder: nn.Module) -> Architecture | None:
    """`decoder`'s architecture where the lean step knows it, it is wholly on the host and
    no module's forward was replaced (accelerate's placement wraps them at load)."""
    architecture = ARCHITECTURES.get(type(decoder))
    if architecture is None:
        return None
    if any(t.device.type != "cpu" for t in (*decoder.parameters(), *decoder.buffers())):
        return None
    if any("forward" in vars(m) or "_hf_hook" in vars(m) for m in decoder.modules()):
        return None
    return architecture


def _hooked(modules: list[weakref.ref]) -> bool:
    """Whether a module has a forward hook, its own or a global one, that calling its
    forward directly would skip."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return True
    for ref in modules:
        module = ref()
        if module is not None and (module._forward_hooks or module._forward_pre_hooks):
            return True
    return False


def lean_decode(decoder: nn.Module, architecture: Architecture, step: PagedStep,
                embeds: torch.Tensor) -> torch.Tensor:
    """One decode step: `embeds` [rows, 1, hidden], one new token per row; next-token
    logits [rows, vocab], as `decoder(..., cache=step, logits_to_keep=1)` gives them."""
    rows = embeds.shape[0]

    def attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        key, value = step.update(key, value, attention.layer_idx)
        # the query heads that share a KV head as that head's queries (transformers'
        # pack_gqa for one new token): keys are read once per KV head, not repeated
        query = query.reshape(rows, key.shape[1], -1, query.shape[-1])
        return F.scaled_dot_product_attention(query, key, value, attn_mask=step.mask,
                                              scale=attention.scaling)

    hidden = _through_layers(decoder, architecture, embeds, step.positions, attend)
    return decoder.lm_head.forward(hidden)[:, -1]


def lean_segments(decoder: nn.Module, architecture: Architecture, step: SegmentStep,
                  embeds: torch.Tensor) -> torch.Tensor:
    """One forward over a pack of segments (model/paged/segment_step.py): `embeds`
    [1, tokens, hidden]; the logits after each segment's last token [segments, vocab], as
    `decoder(..., cache=step, paged_step=step, logits_to_keep=step.last)` gives them."""

    def attend(attention: nn.Module, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor) -> torch.Tensor:
        step.update(key, value, attention.layer_idx)
        return step.attend(attention.layer_idx, query, attention.scaling)

    hidden = _through_layers(decoder, architecture, embeds, step.positions, attend)
    return decoder.lm_head.forward(hidden[:, step.last])[0]


def _through_layers(decoder: nn.Module, architecture: Architecture, embeds: torch.Tensor,
                    positions: torch.Tensor, attend: Attend) -> torch.Tensor:
    """The decoder's layers and final norm over `embeds` [batch, tokens, hidden]; each
    layer's attention over the new keys and values is `attend`'s."""
    model = architecture.text_model(decoder)
    if architecture.rope_axes > 1 and positions.dim() == 2:  # one position for every axis
        positions = positions[None].expand(architecture.rope_axes, positions.shape[0], -1)
    cos, sin = model.rotary_emb.forward(embeds, positions)
    hidden = embeds
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        x = _rms_norm(layer.input_layernorm, hidden)
        query, key, value = (_heads(projected, attention.head_dim)
                             for projected in sibling_outputs(attention, "qkv_rows", x))
        query, key = architecture.rope(query, key, cos, sin)
        attended = attend(attention, query, key, value)
        attended = attention.o_proj.forward(attended.reshape(*hidden.shape[:2], -1))
        if architecture.sandwich_norms:
            attended = _rms_norm(layer.post_self_attn_layernorm, attended)
        hidden = hidden + attended
        x = _rms_norm(layer.post_attention_layernorm, hidden)
        if architecture.gate_up_proj:  # as GLM's MLP computes it
            gate, up = mlp.gate_up_proj.forward(x).chunk(2, dim=-1)
            x = mlp.down_proj.forward(up * mlp.activation_fn(gate))
        else:  # Llama's two projections, one int8 call where they share rows
            gate, up = sibling_outputs(mlp, "gate_up_rows", x)
            x = mlp.down_proj.forward(mlp.act_fn(gate) * up)
        if architecture.sandwich_norms:
            x = _rms_norm(layer.post_mlp_layernorm, x)
        hidden = hidden + x
    return _rms_norm(model.norm, hidden)


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]."""
    return projected.view(*projected.shape[:2], -1, head_dim).transpose(1, 2)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The RMSNorm all three architectures share: in float32, scaled in the input's type."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)
