"""A module unit: one part of the modular model with its own residency tier.

Tiers, fastest first: `cuda:N` -> `cpu` -> `disk` (parameters released; reloaded from
the checkpoint on next use). A unit is moved only when no running request uses it:
`use()` holds it resident, `move_to()` waits for users to finish.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from inference_svc.model.checkpoints.placement import bytes_by_device
from inference_svc.model.host_linears import parameter_count
from inference_svc.process_memory import release_freed_memory

DISK = "disk"


def own_memory(module: nn.Module) -> nn.Module:
    """Copy tensors that still map the checkpoint file into memory the module owns.

    Loaders may hand back tensors backed by a memory-mapped safetensors file; those
    pages are neither fully resident nor freed by dropping the module, so residency
    could not be measured or controlled.
    """
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
    return module


@dataclass(frozen=True)
class UnitState:
    name: str
    modality: str
    tier: str  # "cuda:N", "cpu" or "disk"
    weight_bytes: int
    active_requests: int
    idle_seconds: float
    parameters: int
    bytes_by_device: dict[str, int]
    precision: str  # what its Linear weights are held in: "fp32", "bf16", "int8", ...


def weights_by_device(states: Iterable[UnitState]) -> dict[str, int]:
    """Resident weight bytes per device over the given units."""
    totals: dict[str, int] = {}
    for state in states:
        for device, size in state.bytes_by_device.items():
            totals[device] = totals.get(device, 0) + size
    return totals


class ModuleUnit:
    """Holds one nn.Module and moves it between tiers safely under concurrency."""

    def __init__(
        self,
        name: str,
        modality: str,
        loader: Callable[[], nn.Module],
        home: str,
        *,
        precision: str,
        pin_memory: bool = False,
        placed_by_loader: bool = False,
    ) -> None:
        self.name = name
        self.modality = modality
        self.home = home
        self.precision = precision
        self._loader = loader
        self._pin_memory = pin_memory
        # a loader that places the module itself (an accelerate device map over several
        # GPUs) owns its home placement: the unit only drops it to disk and reloads it
        self._placed_by_loader = placed_by_loader
        self._bytes_by_device: dict[str, int] = {}
        self._module: nn.Module | None = None
        self._tier = DISK
        self._resident_bytes = 0
        self._parameters = 0
        self.architecture = ""
        self._active = 0
        self._last_used = time.monotonic()
        self._cond = threading.Condition()

    @property
    def tier(self) -> str:
        return self._tier

    def state(self) -> UnitState:
        with self._cond:
            return UnitState(
                name=self.name, modality=self.modality, tier=self._tier,
                weight_bytes=self._resident_bytes, active_requests=self._active,
                idle_seconds=0.0 if self._active else time.monotonic() - self._last_used,
                parameters=self._parameters, bytes_by_device=dict(self._bytes_by_device),
                precision=self.precision,
            )

    def load(self) -> None:
        with self._cond:
            self._ensure_home()

    @contextlib.contextmanager
    def use(self) -> Iterator[nn.Module]:
        """Hold the module resident on its home tier for the duration of the block."""
        with self._cond:
            self._ensure_home()
            self._active += 1
            module = self._module
        try:
            assert module is not None
            yield module
        finally:
            with self._cond:
                self._active -= 1
                self._last_used = time.monotonic()
                self._cond.notify_all()

    def move_to(self, tier: str, *, timeout: float | None = None) -> int:
        """Move to `tier`; returns the bytes of weights that left the previous tier.

        Waits (up to `timeout`) until no request uses the module; returns 0 when it
        timed out or when the module already is on that tier.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._active == 0, timeout=timeout):
                return 0
            if tier == self._tier:
                return 0
            before = self._resident_bytes
            if tier == DISK:
                self._module = None
                self._tier = DISK
                self._resident_bytes = 0
                self._bytes_by_device = {}
                gc.collect()
                return before
            if self._placed_by_loader:
                return 0  # a device-mapped module moves only between its placement and disk
            if self._module is None:
                self._load_module()
            self._module.to(tier)
            if tier == "cpu" and self._pin_memory and torch.cuda.is_available():
                for tensor in [*self._module.parameters(), *self._module.buffers()]:
                    tensor.data = tensor.data.pin_memory()
            self._tier = tier
            self._measure()
            return before

    def _ensure_home(self) -> None:
        if self._tier == self.home:
            return
        if self._module is None:
            self._load_module()
        if not self._placed_by_loader:
            self._module.to(self.home)
        self._tier = self.home
        self._measure()

    def _measure(self) -> None:
        self._bytes_by_device = bytes_by_device(self._module)
        self._resident_bytes = sum(self._bytes_by_device.values())

    def _load_module(self) -> None:
        module = own_memory(self._loader())
        # what loading freed (checkpoint buffers, the quantizers' temporaries) goes back to
        # the system: glibc keeps it otherwise, and an int8 embedded default held ~300-400
        # MiB more resident than it needed
        release_freed_memory()
        self._parameters = parameter_count(module)
        self.architecture = getattr(module, "architecture", type(module).__name__)
        self._module = module
