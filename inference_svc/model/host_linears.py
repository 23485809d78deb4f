"""What the host's quantized Linear layers (model/int8_rows.py, model/int4_groups.py)
share: they replace torchao's quantized Linears, hold the projections that read one
input as one weight, and make a weight of row blocks quantized one after another.

Projections that read one input (attention's q, k and v; an MLP's gate and up) are held
as one weight, their rows end to end (`SIBLINGS`): a decode step that wants all of them
calls the kernel once (model/paged/lean_forward.py; one row of the embedded default in
int8: 24.2 -> 21.8 ms a step on 2 cores, fewer calls and bf16 conversions), and each
projection alone is a slice of those rows, computing exactly what it did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar

import torch
from torch import nn

# the attribute an owner keeps its siblings' shared rows under -> the siblings, in order
SIBLINGS = {"qkv_rows": ("q_proj", "k_proj", "v_proj"), "gate_up_rows": ("gate_proj", "up_proj")}


class HostLinear(nn.Module):
    """A quantized Linear on the host whose tensors hold its rows along `ROW_DIMS`."""

    # each tensor attribute that holds the layer's rows -> the dimension they are on
    ROW_DIMS: ClassVar[dict[str, int]]
    # whether projections of one input of this kind are held as one layer (`rows`)
    SHARES_ROWS: ClassVar[bool] = False
    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def with_rows(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None, *,
                  copy: bool = False) -> HostLinear:
        """A layer of this kind over other rows (`tensors` as `ROW_DIMS` names them)."""
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> nn.Module:
        """The projection of rows [start, stop), read from this layer in place (where
        `SHARES_ROWS`)."""
        raise NotImplementedError


def parameter_count(module: nn.Module) -> int:
    """`module`'s parameters as its floating model has them: a host layer whose weight is
    packed (int4: two a byte) counts that weight's rows x columns."""
    counts: dict[int, int] = {}
    for layer in module.modules():
        for name, parameter in layer.named_parameters(recurse=False):
            packed = isinstance(layer, HostLinear) and name == "qdata"
            counts[id(parameter)] = (layer.out_features * layer.in_features if packed
                                     else parameter.numel())
    return sum(counts.values())


def sibling_outputs(owner: nn.Module, shared: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Each of `SIBLINGS[shared]`'s outputs for `x`: from one multiplication where `owner`
    holds them as shared rows, else from each projection."""
    names = SIBLINGS[shared]
    whole = owner._modules.get(shared)  # a miss through getattr costs an exception
    if whole is None:
        return [getattr(owner, name).forward(x) for name in names]
    return list(whole.forward(x).split([getattr(owner, n).out_features for n in names], -1))


def replace_linears(module: nn.Module,
                    convert: Callable[[nn.Linear], HostLinear | None]) -> nn.Module:
    """`module` with each Linear that `convert` makes a host layer of replaced by it, and
    the projections of one input sharing their rows: in place, or, where `module` is such
    a Linear itself, its replacement."""
    if isinstance(module, nn.Linear):
        layer = convert(module)
        return module if layer is None else layer
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and (layer := convert(child)) is not None:
            parent_name, _, attribute = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attribute, layer)
    for owner in list(module.modules()):
        for shared, names in SIBLINGS.items():
            _share_rows(owner, shared, names)
    return module


def stacked(blocks: Iterable[nn.Module], total: int, bias: torch.Tensor | None, *,
            copy: bool = False) -> HostLinear | None:
    """One layer over `blocks`' rows end to end (`total` of them), each of its tensors
    allocated once and filled as the blocks come: a head quantized block by block (the
    largest weight there is) is then held once, not twice as a concatenation would.
    None where a block is not a host layer (its shape left it unquantized)."""
    tensors: dict[str, torch.Tensor] = {}
    start = 0
    for block in blocks:
        if not isinstance(block, HostLinear):
            return None
        if not tensors:
            first = block
            for name, dim in block.ROW_DIMS.items():
                shape = list(getattr(block, name).shape)
                shape[dim] = total
                tensors[name] = getattr(block, name).new_empty(shape)
        for name, dim in block.ROW_DIMS.items():
            tensors[name].narrow(dim, start, block.out_features).copy_(getattr(block, name))
        start += block.out_features
    if start != total:
        raise ValueError(f"{start} rows stacked where {total} were announced")
    return first.with_rows(tensors, bias, copy=copy)


def _share_rows(owner: nn.Module, shared: str, names: tuple[str, ...]) -> None:
    """`owner`'s projections `names`, where all are host layers of one kind that shares
    rows, over one input with a bias each or none, as rows of one layer registered as
    `shared`."""
    parts = [getattr(owner, name, None) for name in names]
    kind = type(parts[0])
    if not (issubclass(kind, HostLinear) and kind.SHARES_ROWS
            and all(type(p) is kind for p in parts)):
        return
    if len({p.in_features for p in parts}) != 1 or len({p.bias is None for p in parts}) != 1:
        return
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    whole = stacked(parts, sum(p.out_features for p in parts), bias)
    setattr(owner, shared, whole)
    start = 0
    for name, part in zip(names, parts, strict=True):
        setattr(owner, name, whole.rows(start, start + part.out_features))
        start += part.out_features
