"""Where modules go: one device, the decoder spread over every GPU with accelerate, or
the decoder's layers split over a list of devices.

`device="auto"` with CUDA present loads the decoder with accelerate's device map under a
per-GPU `max_memory` that leaves a fraction of each card for the KV cache, and puts the
encoders on a chosen card (the last one by default). `device="cuda:0,cuda:1"` (any list,
`cpu` included) splits the decoder's layers over those devices evenly and in order, a
pipeline as the reference deployment spreads GLM-4.1V over two cards: each device holds
its layers and their KV; the encoders go to the first device unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


@dataclass(frozen=True)
class Placement:
    decoder_device: str  # "cpu", "cuda:N", "auto" (device map over all GPUs) or "split"
    encoder_device: str
    max_memory: dict[int | str, int] | None = None
    layer_devices: tuple[str, ...] = ()  # "split": the decoder's layers over these

    @property
    def sharded(self) -> bool:
        return self.decoder_device == "auto"


class UnplaceableDevice(ValueError):
    """`--device` names devices this machine does not have, or a split the model cannot
    take: a start-up error (exit 2), not a crash."""


def split_layers(layers: int, devices: Sequence[str]) -> list[str]:
    """Each of `layers` decoder layers' device: the devices in order, as evenly as they
    divide (the first ones take one more when they do not)."""
    share, extra = divmod(layers, len(devices))
    return [device for index, device in enumerate(devices)
            for _ in range(share + (index < extra))]


def _checked(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnplaceableDevice(f"--device {device}: CUDA is not available")
    return device


def gpu_max_memory(kv_reserve_fraction: float) -> dict[int | str, int]:
    """Per-GPU weight budget: total memory less the share kept for KV and activations."""
    budget: dict[int | str, int] = {}
    for index in range(torch.cuda.device_count()):
        _, total = torch.cuda.mem_get_info(index)
        budget[index] = int(total * (1.0 - kv_reserve_fraction))
    return budget


def plan_placement(device: str, *, encoder_device: str = "",
                   kv_reserve_fraction: float = 0.3) -> Placement:
    if not 0.0 <= kv_reserve_fraction < 1.0:
        raise ValueError("kv_reserve_fraction must be in [0, 1)")
    if device == "auto":
        count = torch.cuda.device_count()
        if count == 0:
            return Placement("cpu", encoder_device or "cpu")
        if count == 1:
            return Placement("cuda:0", encoder_device or "cuda:0")
        return Placement("auto", encoder_device or f"cuda:{count - 1}",
                         gpu_max_memory(kv_reserve_fraction))
    if "," in device:
        devices = tuple(_checked(d.strip()) for d in device.split(","))
        if not all(d == "cpu" or d.startswith("cuda:") for d in devices):
            raise UnplaceableDevice(f"--device {device}: a device list splits the decoder's "
                                    "layers over cpu and cuda:N devices only")
        return Placement("split", encoder_device or devices[0], layer_devices=devices)
    return Placement(_checked(device), encoder_device or device)


def bytes_by_device(module: torch.nn.Module) -> dict[str, int]:
    totals: dict[str, int] = {}
    seen: set[int] = set()
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        key = str(tensor.device)
        totals[key] = totals.get(key, 0) + tensor_bytes(tensor)
    return totals


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a quantized weight (a torchao tensor subclass, whose numel
    and element size describe the floating tensor it stands for) counts its inner
    tensors: int8 data and scales, packed int4 and their group scales, ..."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(inner) for inner in (getattr(tensor, n) for n in names)
                   if inner is not None)
    return tensor.numel() * tensor.element_size()
