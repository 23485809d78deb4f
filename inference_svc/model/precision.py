"""Weight precision per module: what `--decoder-weights` and `--vision-weights` may say,
what each device can run, and the torchao configuration that quantizes the Linear layers.

Floating types (fp32, bf16, fp16) load as they are. The quantized precisions replace
each Linear's weight with a torchao tensor subclass (weight-only int8 per output row,
int4 in groups of 128 on CUDA and 32 on the host, or float8 per row with float8
activations): it behaves as a weight under `F.linear`, so the model's own forward, the
paged forward and CUDA graph capture run it unchanged (on the host each quantized Linear
then becomes a layer of our own over the same bytes: `with_host_kernels`). Embeddings
and norms keep the module's floating type; so does the lm_head, except on the host under
int8 or int4 (`with_host_head`), where the head is the widest matrix a decode step reads
and becomes int8.

torchao is imported only when a module is quantized: a float-only service never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from inference_svc.model import cpu_features

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig

FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOAT_NAMES = {dtype: name for name, dtype in FLOATS.items()}
# CUDA's int4 (tinygemm) and float8 kernels take bfloat16 activations only. On the host
# the int4 and int8 kernels take bfloat16 too, and where the CPU has bfloat16 units
# (model/cpu_features.py) a quantized module computes in bfloat16 throughout: its prefill
# matmuls and attention run on those units (the embedded default in int8: a 3,000-token
# prompt's first token 7.09 -> 4.18 s on 2 cores; int4 11.52 -> 9.40 s; decode as fast;
# perplexity 12.613 -> 12.560 in int8, 12.526 -> 12.512 in int4, fp32's 12.516). A CPU
# without them keeps the module's type, casting around the kernels.
BF16_ONLY = ("int4", "fp8")
# compute capability each quantized precision needs on a CUDA device; None: no CUDA kernel
CUDA_CAPABILITY = {"int8": (0, 0), "int4": (8, 0), "fp8": (8, 9)}
CPU_RUNS = ("int8", "int4")
HEAD_ROWS_AT_ONCE = 4096
# a decoder's precision on the host -> its LM head's: int8 under int4 too, as llama.cpp's
# 4-bit types keep the output matrix at 6 bits or more (on the embedded default an int4
# head cost +4.0% perplexity for 1.12x decode speed, an int8 one +0.06%)
HOST_HEADS = {"int8": "int8", "int4": "int8"}
# a quantized decoder on the host holds its token table in bfloat16, its lookups coming
# out in the decoder's type: the table is only read a row per token, and in float32 it is
# most of what is left of the decoder's bytes (GLM-4.1V-9B's: 2.3 GiB beside 5.3 of int4)
HOST_TABLE = torch.bfloat16
# and its KV cache in bfloat16 (as llama.cpp's f16 by default): attention reads it back in
# the decoder's type, and in float32 a GLM-4.1V-9B phone agent's 25,480 tokens of KV
# took 1.9 GiB of a host's memory
HOST_KV = torch.bfloat16


class UnsupportedPrecision(ValueError):
    """A weight precision the chosen device cannot run: a start-up error naming the flag."""


@dataclass(frozen=True)
class WeightPrecision:
    """How a module's weights are held: `name` is what GetModelInfo reports ("fp32",
    "bf16", "fp16", "int8", "int4" or "fp8"); `dtype` is its activations' type and that of
    the weights left unquantized."""

    name: str
    dtype: torch.dtype

    @classmethod
    def of(cls, dtype: torch.dtype) -> WeightPrecision:
        return cls(FLOAT_NAMES[dtype], dtype)

    @property
    def quantized(self) -> bool:
        return self.name not in FLOATS

    def torchao_config(self) -> AOBaseConfig:
        """The torchao configuration of this precision's Linear weights."""
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
        )

        # set_inductor_config=False: nothing here compiles, and the setting is process-wide
        if self.name == "int8":
            return Int8WeightOnlyConfig(set_inductor_config=False)
        if self.name == "int4":
            from inference_svc.model.int4_groups import Int4WeightByDeviceConfig

            return Int4WeightByDeviceConfig()
        if self.name == "fp8":
            return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(),
                                                             set_inductor_config=False)
        raise ValueError(f"{self.name} weights are not quantized")

    def placed_on(self, device: str) -> dict:
        """`from_pretrained` keyword arguments that load a quantized module straight onto
        its CUDA device: torchao's int4 and float8 layouts are made on the device that
        runs them, and each weight is quantized there as it arrives."""
        if self.quantized and device.startswith("cuda"):
            return {"device_map": {"": device}}
        return {}

    def pretrained_kwargs(self, keep: list[str]) -> dict:
        """`from_pretrained` keyword arguments that load in this precision, quantizing each
        Linear weight as it is read (modules named in `keep` stay in `dtype`)."""
        if not self.quantized:
            return {"dtype": self.dtype}
        from transformers import TorchAoConfig

        return {"dtype": self.dtype,
                "quantization_config": TorchAoConfig(self.torchao_config(),
                                                     modules_to_not_convert=keep)}


def quantize_linears(module: nn.Module, precision: WeightPrecision) -> nn.Module:
    """Quantize `module`'s Linear weights in place, one layer after another (each full
    precision weight is released as its quantized one replaces it)."""
    if precision.quantized:
        from torchao.quantization import quantize_

        quantize_(module, precision.torchao_config())
    return with_host_kernels(module, precision)


def with_host_head(decoder: nn.Module, precision: WeightPrecision) -> nn.Module:
    """`decoder`, loaded on the host, with its LM head in int8 where the decoder is int8
    or int4 (`HOST_HEADS`): in an int8 decoder that makes a decode step of the embedded
    default ~1.12x faster eager and ~1.18x compiled for +0.04% perplexity
    (docs/operations.md). A head tied to the token embedding becomes a quantized copy
    beside the floating table the inputs are looked up in (+27 MiB there in int8); an
    untied one is replaced. The plan counts the same (model/sizing/weights.py
    `held_tensors`)."""
    if precision.name not in HOST_HEADS:
        return decoder
    precision = WeightPrecision(HOST_HEADS[precision.name], precision.dtype)
    from inference_svc.model.host_linears import stacked

    head = decoder.get_output_embeddings()
    tied = head.weight is decoder.get_input_embeddings().weight
    weight = head.weight.detach()
    # a block of rows at a time: quantizing makes float temporaries the size of what it
    # quantizes, and a head is the largest matrix there is (a whole one added ~300 MiB to
    # the embedded default's peak); rows are quantized each on its own, so the result is
    # the whole head's
    bias = None if head.bias is None else head.bias.detach()
    rows = weight.shape[0]
    blocks = (_quantized_rows(weight[start:start + HEAD_ROWS_AT_ONCE], precision)
              for start in range(0, rows, HEAD_ROWS_AT_ONCE))
    quantized = stacked(blocks, rows, bias, copy=tied)
    if quantized is not None:
        decoder.set_output_embeddings(quantized)
    return decoder


def kv_dtype(precision: WeightPrecision, *, host: bool) -> torch.dtype:
    """The type a decoder in `precision` keeps its KV cache in: its own, but `HOST_KV`
    for a quantized decoder on the `host` (where it is narrower)."""
    if host and precision.name in HOST_HEADS and precision.dtype.itemsize > HOST_KV.itemsize:
        return HOST_KV
    return precision.dtype


class NarrowTable(nn.Embedding):
    """A token table held in a narrower type than its model computes in: its lookups come
    out in `out_dtype`."""

    def __init__(self, table: nn.Embedding, dtype: torch.dtype) -> None:
        # made on the meta device: its own (random) weight would be made only to be replaced
        super().__init__(table.num_embeddings, table.embedding_dim,
                         padding_idx=table.padding_idx, device="meta")
        self.out_dtype = table.weight.dtype
        self.weight = nn.Parameter(table.weight.detach().to(dtype), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.out_dtype)


def for_the_host(decoder: nn.Module, precision: WeightPrecision) -> nn.Module:
    """`decoder`, loaded whole on the host, with its LM head and token table as a decoder
    in `precision` holds them there: the head first, so that a head tied to the table
    has its own copy before the table narrows."""
    return with_host_table(with_host_head(decoder, precision), precision)


def with_host_table(decoder: nn.Module, precision: WeightPrecision) -> nn.Module:
    """`decoder`, loaded on the host, with its token table in `HOST_TABLE` where the
    decoder is quantized (its LM head, if tied to the table, already has a copy of its
    own: `with_host_head` comes first). On the embedded default in int4 the decoder's
    bytes went from 198 to 144 MiB, its perplexity from 12.523 to 12.524."""
    table = decoder.get_input_embeddings()
    if precision.name not in HOST_HEADS or table.weight.dtype.itemsize <= HOST_TABLE.itemsize:
        return decoder
    if getattr(decoder.get_output_embeddings(), "weight", None) is table.weight:
        raise ValueError("the LM head still reads the token table: with_host_head first")
    decoder.set_input_embeddings(NarrowTable(table, HOST_TABLE))
    return decoder


def _quantized_rows(rows: torch.Tensor, precision: WeightPrecision) -> nn.Module:
    # made on the meta device: its own (random) weight would be made only to be replaced
    block = nn.Linear(rows.shape[1], rows.shape[0], bias=False, device="meta")
    block.weight = nn.Parameter(rows, requires_grad=False)
    return quantize_linears(block, precision)


def with_host_kernels(module: nn.Module, precision: WeightPrecision) -> nn.Module:
    """`module` (quantized by torchao) with its int8 and int4 Linear layers on a CPU
    multiplying their bytes directly (model/int8_rows.py, model/int4_groups.py)."""
    if precision.name == "int8":
        from inference_svc.model.int8_rows import repack_int8_linears

        return repack_int8_linears(module)
    if precision.name == "int4":
        from inference_svc.model.int4_groups import repack_int4_linears

        return repack_int4_linears(module)
    return module


def resolve_precision(flag: str, choice: str, dtype: torch.dtype,
                      devices: list[str]) -> WeightPrecision:
    """The precision `choice` of the flag means for a module of type `dtype` (what
    `--dtype` gives it, and what `auto` keeps) on `devices`; UnsupportedPrecision,
    naming the flag, where one of them cannot run it."""
    if choice == "auto":
        return WeightPrecision.of(dtype)
    if choice in FLOATS:
        return WeightPrecision.of(FLOATS[choice])
    for device in devices:
        _check_device(flag, choice, device)
    on_cuda = any(device.startswith("cuda") for device in devices)
    in_bf16 = choice in BF16_ONLY if on_cuda else cpu_features.BF16_UNITS
    return WeightPrecision(choice, torch.bfloat16 if in_bf16 else dtype)


def _check_device(flag: str, choice: str, device: str) -> None:
    if not device.startswith("cuda"):
        if choice not in CPU_RUNS:
            raise UnsupportedPrecision(
                f"{flag} {choice}: {device} cannot run {choice} weights (torchao has "
                f"{choice} kernels for CUDA only); on a CPU the quantized choice is "
                f"{' or '.join(CPU_RUNS)}")
        return
    need = CUDA_CAPABILITY[choice]
    have = torch.cuda.get_device_capability(torch.device(device))
    if have < need:
        raise UnsupportedPrecision(
            f"{flag} {choice}: {device} ({torch.cuda.get_device_name(torch.device(device))}, "
            f"compute capability {have[0]}.{have[1]}) cannot run {choice} weights, which "
            f"need compute capability {need[0]}.{need[1]} or newer")
