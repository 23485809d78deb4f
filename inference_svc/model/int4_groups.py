"""int4 weight-only Linear layers on any device: two weights a byte, a bfloat16 scale and
zero point per group of input columns, multiplied by the device's own int4 kernel.

`Int4WeightByDeviceConfig` is torchao's int4 weight-only quantization made per device.
A weight on CUDA takes torchao's `Int4WeightOnlyConfig` as it is (groups of 128, the
tinygemm tile layout). A weight on the CPU, where that layout has no kernel, is quantized
the same way (torchao's tinygemm scales and zero points, asymmetric 0..15) into torchao's
`Int4OpaqueTensor`, packed for PyTorch's `_weight_int4pack_mm_for_cpu`, in groups of 32,
the finest that kernel takes: it costs a tenth more bytes than groups of 128 and no
measurable speed, and keeps more of the weights (the embedded default was made from a
Q4_1 GGUF, 4 bits in blocks of 32: in groups of 32 int4 holds its own weights and its
perplexity moves by 0.01%; in groups of 64 by +43%). A layer whose input width is not a
multiple of 32, or whose rows the kernel cannot pack (not a multiple of 16), keeps its
floating weight. `repack_int4_linears` then turns each such Linear into an
`Int4GroupsLinear` over the same bytes: a plain module that calls the kernel and that
torch.compile traces (the tensor subclass's dispatch costs ~25 us a call, and a one-row
step of the embedded default makes 210 of them in ~22 ms).

Measured on 2 cores (ms a call; activations cast to bfloat16, as the kernel's float32
form is ~30x slower):

    matrix       rows  fp32 Linear  int8 kernel  int4 kernel
    1536x576        1     0.050        0.038        0.034
                  256     1.82         4.18         3.65
    49152x576       1     2.39         1.12         0.92
    27392x4096      1    23.0          8.06         5.48
                  256   284.5        576.2        522.6

so a decode step reads half int8's bytes and is as fast or faster, while a prefill chunk
computes at about half a float matmul's speed. Every row count takes the kernel: the
packed layout can be read (blocks of 64 rows with AVX-512, a byte's two nibbles rows j
and j+32; it depends on the CPU), but unpacking the 27,392 x 4,096 matrix for a
bfloat16 matmul took 0.65-1.0 s in PyTorch operations (eager, compiled, or through an
embedding lookup table) against the kernel's 0.31 s for a whole 128-row call.

Unlike int8's, projections that read one input are not joined into one weight
(model/host_linears.py `SIBLINGS`): the kernel reads its scales contiguous, so each
projection would need a copy of its own (~0.6 GB for GLM-4.1V-9B in groups of 32), and
joined, the embedded default decoded no faster (31.6 against 32.3 tok/s, medians of 5
alternating runs).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization import Int4WeightOnlyConfig
from torchao.quantization.quant_api import _linear_extra_repr
from torchao.quantization.quantize_.workflows import Int4PackingFormat
from torchao.quantization.transform_module import (
    _QUANTIZE_CONFIG_HANDLER,
    register_quantize_module_handler,
)

from inference_svc.model.host_linears import HostLinear, replace_linears

HOST_GROUP = 32
# the CPU kernel packs rows 16 at a time at least
HOST_ROW_MULTIPLE = 16
CUDA_GROUP = 128


def host_group_size(in_features: int, out_features: int) -> int | None:
    """The group a host int4 weight of this shape takes; None: it stays floating."""
    if out_features % HOST_ROW_MULTIPLE or in_features % HOST_GROUP:
        return None
    return HOST_GROUP


@dataclass
class Int4WeightByDeviceConfig(AOBaseConfig):
    """int4 weight-only with groups, in the layout of the device the weight is on."""

    set_inductor_config: bool = False


@register_quantize_module_handler(Int4WeightByDeviceConfig)
def _quantize_int4(module: nn.Module, config: Int4WeightByDeviceConfig) -> nn.Module:
    weight = module.weight
    if weight.device.type != "cpu":
        cuda = Int4WeightOnlyConfig(group_size=CUDA_GROUP, set_inductor_config=False,
                                    int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        return _QUANTIZE_CONFIG_HANDLER[Int4WeightOnlyConfig](module, cuda)
    group = host_group_size(weight.shape[1], weight.shape[0])
    if group is None:
        return module
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    # from bfloat16, as on CUDA (torchao's tile layout quantizes bfloat16 weights): the
    # same scales and zero points wherever the layer runs
    quantized = Int4OpaqueTensor.from_hp(weight.detach().to(torch.bfloat16), [1, group])
    module.weight = nn.Parameter(quantized, requires_grad=False)
    module.extra_repr = types.MethodType(_linear_extra_repr, module)
    return module


class Int4GroupsLinear(HostLinear):
    """y = x W^T (+ b) with W held packed for the CPU int4 kernel: `qdata` [out, in/2]
    uint8 and `scale_and_zero` [in/group, out, 2] bfloat16."""

    ROW_DIMS: ClassVar[dict[str, int]] = {"qdata": 0, "scale_and_zero": 1}

    def __init__(self, qdata: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, *, copy: bool = False) -> None:
        """`copy`: the weight is a copy of one the model holds elsewhere (a head tied to
        the embedding), kept as a buffer so that the model's parameter count stays its
        own; otherwise a parameter, as the Linear's weight was."""
        super().__init__()
        self.out_features, self.in_features = qdata.shape[0], qdata.shape[1] * 2
        self.group_size = group_size
        if copy:
            self.register_buffer("qdata", qdata.contiguous())
        else:
            self.qdata = nn.Parameter(qdata.contiguous(), requires_grad=False)
        self.register_buffer("scale_and_zero", scale_and_zero.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _multiply(x, self.qdata, self.group_size, self.scale_and_zero, self.bias)

    def with_rows(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                  copy: bool = False) -> Int4GroupsLinear:
        return Int4GroupsLinear(tensors["qdata"], tensors["scale_and_zero"], self.group_size,
                                bias, copy=copy)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 in groups of {self.group_size}")


def _multiply(x: torch.Tensor, qdata: torch.Tensor, group_size: int,
              scale_and_zero: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, qdata.shape[1] * 2).to(torch.bfloat16).contiguous()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        flat, qdata, group_size, scale_and_zero).to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], qdata.shape[0])


def repack_int4_linears(module: nn.Module) -> nn.Module:
    """`module` with each Linear whose weight is a host int4 tensor replaced by an
    `Int4GroupsLinear` over the same bytes: in place, or, where `module` is such a Linear
    itself, its replacement."""
    return replace_linears(module, _repacked)


def _repacked(linear: nn.Linear) -> Int4GroupsLinear | None:
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor

    weight = linear.weight
    if not (isinstance(weight, Int4OpaqueTensor) and weight.device.type == "cpu"
            and weight.act_mapping_type is None and weight.act_pre_scale is None):
        return None
    bias = None if linear.bias is None else linear.bias.detach()
    return Int4GroupsLinear(weight.qdata, weight.scale_and_zero, weight.block_size[1], bias)
