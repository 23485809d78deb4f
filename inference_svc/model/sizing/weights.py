"""Bytes of a module's weights at a precision: full (the serving dtype) or quantized
weight-only as torchao stores it.

The layouts, per weight of `out` rows by `inp` columns (torchao 0.18):
  int8  Int8WeightOnlyConfig: int8 weights, a float32 scale and an int8 zero point per row;
        on the host the service keeps the int8 weights and a bf16 scale per row
        (model/int8_rows.py);
  fp8   Float8WeightOnlyConfig: float8 weights, a float32 scale per row;
  int4  Int4WeightOnlyConfig(group_size=128): two weights a byte, a bf16 scale and a bf16
        zero point per group of 128 in a row; a Linear whose input width is not a
        multiple of 128 cannot be grouped and stays at full precision; on the host
        (model/int4_groups.py) groups of 32, and a Linear whose input width is not a
        multiple of 32 or whose rows are not a multiple of 16 stays at full precision;
  int8 table  IntxWeightOnlyConfig(weight_dtype=int8, granularity=PerAxis(0)) on an
        nn.Embedding: int8 weights, a scale in the serving dtype and an int8 zero point
        per row.
"""

from __future__ import annotations

from collections.abc import Iterable

from inference_svc.model.sizing.tensors import TensorSpec

FULL_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
INT8_ROW_BYTES = 4 + 1
INT8_HOST_ROW_BYTES = 2
FP8_ROW_BYTES = 4
INT4_GROUP = 128
INT4_HOST_GROUP = 32
INT4_HOST_ROWS = 16
INT4_GROUP_BYTES = 2 + 2
MODULE = "module"
# What a module quantized to int8, fp8 or int4 does with each kind of tensor, as the
# loader that quantizes does it (model/precision.py: --decoder-weights, --vision-weights):
# every nn.Linear weight but the LM head takes the module's precision. The LM head, the
# token embedding, biases, norms, convolutions and position tables stay at full precision,
# but for the LM head of an int8 or int4 decoder on the host (model/precision.py
# `with_host_head`), which is int8,
QUANTIZED_ROLES = {"linear": MODULE}
# and for the token table of an int8 or int4 decoder on the host (`with_host_table`),
# which is bf16.
HOST_ROLES = {"int8": {"linear": MODULE, "lm_head": "int8", "embedding": "bf16"},
              "int4": {"linear": MODULE, "lm_head": "int8", "embedding": "bf16"}}


def tensor_bytes(tensor: TensorSpec, precision: str, full: str, *, host: bool = False) -> int:
    """One tensor's bytes in a module at `precision` (a full type, or a quantized one with
    `full` for the tensors it leaves alone), on a GPU or on the `host`."""
    if precision in FULL_ELEMENT:
        return tensor.numel * FULL_ELEMENT[precision]
    element = FULL_ELEMENT[full]
    roles = HOST_ROLES.get(precision, QUANTIZED_ROLES) if host else QUANTIZED_ROLES
    role = roles.get(tensor.role)
    if role is None:
        return tensor.numel * element
    precision = precision if role == MODULE else role
    if precision in FULL_ELEMENT:
        return tensor.numel * FULL_ELEMENT[precision]
    out, inp = tensor.shape
    if precision == "int8":
        return out * inp + out * (INT8_HOST_ROW_BYTES if host else INT8_ROW_BYTES)
    if precision == "fp8":
        return out * inp + out * FP8_ROW_BYTES
    group = INT4_HOST_GROUP if host else INT4_GROUP
    if inp % group or (host and out % INT4_HOST_ROWS):
        return tensor.numel * element
    return out * inp // 2 + out * (inp // group) * INT4_GROUP_BYTES


def weight_bytes(tensors: Iterable[TensorSpec], precision: str, full: str, *,
                 host: bool = False) -> int:
    return sum(tensor_bytes(t, precision, full, host=host) for t in tensors)


def kv_element(precision: str, full: str, *, host: bool = False) -> int:
    """Bytes of one K or V element of a decoder at `precision`: the serving type's, but
    bf16's for a quantized decoder on the host (model/precision.py `kv_dtype`)."""
    if host and precision in HOST_ROLES:
        return min(FULL_ELEMENT[full], FULL_ELEMENT["bf16"])
    return FULL_ELEMENT[full]


def held_tensors(decoder: list[TensorSpec], precision: str, *,
                 host: bool = False) -> list[TensorSpec]:
    """The decoder's tensors as the service holds them: an int8 or int4 decoder on the
    host gives an LM head tied to the token embedding an int8 copy of its own
    (`with_host_head`)."""
    if (not host or "lm_head" not in HOST_ROLES.get(precision, {})
            or any(t.role == "lm_head" for t in decoder)):
        return decoder
    table = next(t for t in decoder if t.role == "embedding")
    return [*decoder, TensorSpec("lm_head.weight", table.shape)]
