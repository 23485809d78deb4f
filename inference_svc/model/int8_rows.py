"""int8 weight-only Linear layers on a CPU that read their int8 bytes, not a float copy.

torchao's int8 weight-only tensor multiplies by first converting the whole weight to the
activations' type: on a CPU every call writes and reads a full-precision copy of the
weight, and a decode step in int8 ran at 0.66x fp32. PyTorch's `_weight_int8pack_mm`
multiplies the int8 weight as it is, per-row scales applied to the output; it takes
bfloat16 activations on the fast path (its float32 form is several times slower than a
float32 Linear). It pays for the few rows of a decode step, where the weight's bytes
are the cost. A prefill chunk's many rows are compute: there the weight is converted to
bfloat16 for the call and multiplied by the CPU's bfloat16 matrix units (AMX or
AVX512-BF16, through oneDNN), its per-row scales applied to the output, the same
bfloat16 activations the int8 kernel takes.

Measured on 2 cores (Xeon with AMX; ms a call; the middle column is what a wide call did
before, a float32 matmul by the weight dequantized to float32):

    matrix        rows  int8pack (bf16 in)  dequantize + fp32  bf16 matmul
    1536x576         8        0.28               3.20              0.47
                    16        0.54               3.20              0.45
                    32        1.03               3.29              0.52
                   128        4.15               2.65              0.91
    49152x576       16       21.3              100.2              35.8
    (the head)      32       36.4              113.6              39.0
                    64       72.9              128.9              41.2
                   128      148.2              152.7              58.0
    27392x4096      32       98.3              447.5             147.3
    (9B gate/up)    64      211.5              411.0             139.1
                   128      447.3              550.7             164.3

So a layer of up to `PACKED_ROWS` rows takes the int8 kernel and a wider one the
bfloat16 matmul, converting the weight 16M elements at a time (`CONVERTED_ELEMENTS`), so
that a wide call's copy stays ~32 MiB however large the weight; a weight too large for
the caches converts at memory speed, so it takes the int8 kernel up to
`LARGE_PACKED_ROWS` rows. A CPU without bfloat16 units (no AMX, no AVX512-BF16), where
oneDNN emulates them, multiplies a wide call as before, by the weight dequantized to
float32, from 32 rows (128 for a large weight). A compiled decode step
(model/paged/host_compile.py) always takes the int8 kernel: a branch on the row count
there would compile another graph, on the request path, the first time a step passed the
limit. The weights and scales are torchao's, taken over as they are (no second rounding).

Projections that read one input share one int8 weight, their rows end to end
(model/host_linears.py `SIBLINGS`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from inference_svc.model.cpu_features import BF16_UNITS
from inference_svc.model.host_linears import HostLinear, replace_linears

LARGE_WEIGHT_BYTES = 8 << 20
# the most rows the int8 kernel takes, for a weight under LARGE_WEIGHT_BYTES and over it
PACKED_ROWS, LARGE_PACKED_ROWS = (16, 48) if BF16_UNITS else (32, 128)
# a wider call converts the weight this many elements at a time (32 MiB in bfloat16; whole,
# GLM-4.1V-9B's LM head would be a 1.2 GB copy beside its int8 bytes)
CONVERTED_ELEMENTS = 16 << 20


class Int8RowsLinear(HostLinear):
    """y = x W^T (+ b) with W held as int8 [out, in] and one scale per output row."""

    ROW_DIMS: ClassVar[dict[str, int]] = {"qdata": 0, "scale": 0}
    SHARES_ROWS = True

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None, *, copy: bool = False) -> None:
        """`copy`: the weight is a copy of one the model holds elsewhere (a head tied to
        the embedding), kept as a buffer so that the model's parameter count stays its
        own; otherwise a parameter, as the Linear's weight was."""
        super().__init__()
        self.in_features = qdata.shape[1]
        self.out_features = qdata.shape[0]
        if copy:
            self.register_buffer("qdata", qdata.contiguous())
        else:
            self.qdata = nn.Parameter(qdata.contiguous(), requires_grad=False)
        self.register_buffer("scale", scale.reshape(-1).to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _multiply(x, self.qdata, self.scale, self.bias)

    def with_rows(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                  copy: bool = False) -> Int8RowsLinear:
        return Int8RowsLinear(tensors["qdata"], tensors["scale"], bias, copy=copy)

    def rows(self, start: int, stop: int) -> Int8RowsSlice:
        return Int8RowsSlice(self, start, stop)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8RowsSlice(nn.Module):
    """One projection held as rows [start, stop) of a shared `Int8RowsLinear`, which its
    owner registers (so its bytes are counted once) and whose rows are read in place."""

    def __init__(self, whole: Int8RowsLinear, start: int, stop: int) -> None:
        super().__init__()
        self._whole = [whole]  # a reference, not a submodule
        self.start, self.stop = start, stop
        self.in_features, self.out_features = whole.in_features, stop - start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = self._whole[0]
        rows = slice(self.start, self.stop)
        bias = None if whole.bias is None else whole.bias[rows]
        return _multiply(x, whole.qdata[rows], whole.scale[rows], bias)

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.stop} of a shared int8 weight"


def _multiply(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, qdata.shape[1])
    if torch.compiler.is_compiling() or flat.shape[0] <= (
            LARGE_PACKED_ROWS if qdata.numel() >= LARGE_WEIGHT_BYTES else PACKED_ROWS):
        out = torch.ops.aten._weight_int8pack_mm(flat.to(torch.bfloat16), qdata, scale)
    else:
        out = _converted(flat, qdata, scale)
    out = out.to(x.dtype)
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], qdata.shape[0])


def _converted(flat: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A wide call's product by the weight converted for it, a block of rows at a time:
    in bfloat16 with the scales on the output where the CPU has bfloat16 units, else
    dequantized to the activations' type."""
    dtype = torch.bfloat16 if BF16_UNITS else flat.dtype
    flat = flat.to(dtype)
    step = max(1, CONVERTED_ELEMENTS // qdata.shape[1])
    blocks = []
    for start in range(0, qdata.shape[0], step):
        rows = slice(start, start + step)
        if BF16_UNITS:
            blocks.append(F.linear(flat, qdata[rows].to(dtype)) * scale[rows])
        else:
            blocks.append(F.linear(flat, qdata[rows].to(dtype) * scale[rows].to(dtype)[:, None]))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)


def repack_int8_linears(module: nn.Module) -> nn.Module:
    """`module` with each Linear on a CPU whose weight is torchao's int8 weight-only
    per-row tensor replaced by an `Int8RowsLinear` over the same int8 bytes: in place,
    or, where `module` is such a Linear itself, its replacement."""
    return replace_linears(module, _repacked)


def _repacked(linear: nn.Linear) -> Int8RowsLinear | None:
    if not _per_row_int8(linear.weight):
        return None
    bias = None if linear.bias is None else linear.bias.detach()
    return Int8RowsLinear(linear.weight.qdata, linear.weight.scale, bias)


def _per_row_int8(weight: torch.Tensor) -> bool:
    from torchao.quantization import Int8Tensor

    return (isinstance(weight, Int8Tensor) and weight.device.type == "cpu"
            and weight.act_quant_kwargs is None and weight.act_pre_scale is None
            and list(weight.block_size) == [1, weight.qdata.shape[1]]
            and (weight.zero_point is None or not bool(weight.zero_point.any())))
