"""int8 weight-only Linear layers on a CPU that read their int8 bytes, not a float copy.

torchao's int8 weight-only tensor multiplies by first converting the whole weight to the
activations' type: on a CPU every call writes and reads a full-precision copy of the
weight, and a decode step in int8 ran at 0.66x fp32. PyTorch's `_weight_int8pack_mm`
multiplies the int8 weight as it is, per-row scales applied to the output; it takes
bfloat16 activations on the fast path (its float32 form is several times slower than a
float32 Linear). It pays for the few rows of a decode step, where the weight's bytes
are the cost; a prefill chunk's many rows are compute, where a float matmul is faster.

    rows  fp32 Linear  int8pack (bf16 in)  dequantize + fp32   (1536x576, 2 threads, ms)
       1     0.048        0.033               0.093
       4     0.059        0.051               0.116
      16     0.166        0.188               0.226
     256     1.414        2.827               1.566

So a layer of up to `PACKED_ROWS` rows takes the int8 kernel and a wider one multiplies by
the weight dequantized for that call. The weights and scales are torchao's, taken over
as they are (no second rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ROWS = 8


class Int8RowsLinear(nn.Module):
    """y = x W^T (+ b) with W held as int8 [out, in] and one scale per output row."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = qdata.shape[1]
        self.out_features = qdata.shape[0]
        # parameters, as the Linear's were: a module's parameter count stays its weights'
        self.qdata = nn.Parameter(qdata.contiguous(), requires_grad=False)
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= PACKED_ROWS:
            out = torch.ops.aten._weight_int8pack_mm(
                flat.to(torch.bfloat16), self.qdata, self.scale).to(x.dtype)
        else:
            weight = self.qdata.to(x.dtype) * self.scale.to(x.dtype)[:, None]
            out = F.linear(flat, weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def repack_int8_linears(module: nn.Module) -> nn.Module:
    """`module` with each Linear on a CPU whose weight is torchao's int8 weight-only
    per-row tensor replaced by an `Int8RowsLinear` over the same int8 bytes: in place,
    or, where `module` is such a Linear itself, its replacement."""
    if isinstance(module, nn.Linear) and _per_row_int8(module.weight):
        return _repacked(module)
    targets = [(name, child) for name, child in module.named_modules()
               if isinstance(child, nn.Linear) and _per_row_int8(child.weight)]
    for name, child in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attribute, _repacked(child))
    return module


def _repacked(linear: nn.Linear) -> Int8RowsLinear:
    bias = None if linear.bias is None else linear.bias.detach()
    return Int8RowsLinear(linear.weight.qdata, linear.weight.scale, bias)


def _per_row_int8(weight: torch.Tensor) -> bool:
    from torchao.quantization import Int8Tensor

    return (isinstance(weight, Int8Tensor) and weight.device.type == "cpu"
            and weight.act_quant_kwargs is None and weight.act_pre_scale is None
            and list(weight.block_size) == [1, weight.qdata.shape[1]]
            and (weight.zero_point is None or not bool(weight.zero_point.any())))
