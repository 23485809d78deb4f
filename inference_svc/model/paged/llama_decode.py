"""Decode steps of a Llama decoder on the host, without transformers' per-layer plumbing.

On a CPU one decode row of the embedded default is ~22 ms of matmuls (its fp32 weights
read once) and ~2,000 small operations. transformers' layers wrap those operations in
keyword plumbing, deprecation shims, an attention-function lookup, rope and mask helpers
and output objects, and on two cores that wrapping costs about a tenth of the step (one
row at 200 keys: 36.9 -> 33.3 ms in fp32, 30.2 -> 25.9 ms in int8). Here the same
arithmetic runs on the same modules' weights in the same order: the layers' own
projections (whatever precision they hold), norms' weights, rotary embedding and
activation, the step's KV write and gather; attention is PyTorch's SDPA as transformers
calls it for a decode row. vLLM, SGLang and nano-vllm own their model forwards for the
same reason. transformers' forward stays the reference and the path for everything
else: prompt chunks, other architectures, a decoder placed by accelerate's hooks, and
steps replayed from captured CUDA graphs (where launches, not Python, are the cost).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from inference_svc.model.int8_rows import sibling_outputs
from inference_svc.model.paged.kv_pool import PagedStep

DecodeStep = Callable[[PagedStep, torch.Tensor], torch.Tensor]


class HostDecoders:
    """Which decoders take the lean host step, decided once per loaded decoder (a
    decoder reloaded after an offload is a new object and is looked at again)."""

    def __init__(self) -> None:
        self._seen: tuple[weakref.ref, DecodeStep | None] | None = None

    def step_for(self, decoder: nn.Module) -> DecodeStep | None:
        if self._seen is None or self._seen[0]() is not decoder:
            self._seen = (weakref.ref(decoder), _lean_step(decoder))
        return self._seen[1]


def _lean_step(decoder: nn.Module) -> DecodeStep | None:
    """The lean step for `decoder`: a Llama decoder wholly on the host, with no hooks
    (accelerate's placement, or anyone's) that its modules' calls would run."""
    if type(decoder) is not LlamaForCausalLM:
        return None
    if any(t.device.type != "cpu" for t in (*decoder.parameters(), *decoder.buffers())):
        return None
    if any(m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
           for m in decoder.modules()):
        return None
    return lambda step, embeds: llama_decode(decoder, step, embeds)


def llama_decode(decoder: LlamaForCausalLM, step: PagedStep, embeds: torch.Tensor
                 ) -> torch.Tensor:
    """One decode step: `embeds` [rows, 1, hidden], one new token per row; next-token
    logits [rows, vocab], as `decoder(..., cache=step, logits_to_keep=1)` gives them."""
    model = decoder.model
    rows = embeds.shape[0]
    cos, sin = model.rotary_emb.forward(embeds, step.positions)
    cos, sin = cos[:, None], sin[:, None]  # against [rows, heads, 1, head_dim]
    hidden = embeds
    for layer in model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        x = _rms_norm(layer.input_layernorm, hidden)
        query, key, value = (_heads(projected, attention.head_dim)
                             for projected in sibling_outputs(attention, "qkv_rows", x))
        key, value = step.update(_rope(key, cos, sin), value, attention.layer_idx)
        # the query heads that share a KV head as that head's queries (transformers'
        # pack_gqa for one new token): keys are read once per KV head, not repeated
        query = _rope(query, cos, sin).reshape(rows, key.shape[1], -1, query.shape[-1])
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=step.mask,
                                                  scale=attention.scaling)
        hidden = hidden + attention.o_proj.forward(attended.reshape(rows, 1, -1))
        x = _rms_norm(layer.post_attention_layernorm, hidden)
        gate, up = sibling_outputs(mlp, "gate_up_rows", x)
        hidden = hidden + mlp.down_proj.forward(mlp.act_fn(gate) * up)
    return decoder.lm_head.forward(_rms_norm(model.norm, hidden))[:, -1]


def _heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[rows, 1, heads * head_dim] -> [rows, heads, 1, head_dim]."""
    return projected.view(projected.shape[0], 1, -1, head_dim).transpose(1, 2)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm's arithmetic: in float32, then scaled in the input's type."""
    dtype = x.dtype
    x = x.to(torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with the halves rotated, as Llama applies it."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
