"""Decode steps on the host compiled by torch.compile (inductor), where the operator asks.

A lean decode step (model/paged/lean_forward.py) of the embedded default runs ~50 small
operations a layer; on a CPU each costs microseconds of dispatch around a few hundred
bytes of arithmetic, so a one-row step of the int8 model is about as much dispatch as
matmul. Inductor compiles the whole step into a few fused C++ kernels a layer (the norm
with its cast, rope with the KV write and gather, the MLP's activation) around the
matmuls and attention, which stay PyTorch's own kernels: one row of the embedded default
in int8 on 2 cores decodes at ~1.3x the eager lean step (48.4 against 37.7 tok/s; fp32
1.17x; tests/bench/test_llama_cpp.py).

The price is compile time, paid at start-up so that no request waits for it: one graph
for a single row and one for any other number of rows (torch specializes a size of 1),
~95-135 s for both on 2 cores the first time and ~25 s when inductor's cache (in
`TORCHINDUCTOR_CACHE_DIR`) already holds them. Hence `--host-compile` is off by default.
Where compiling fails (no C++ compiler, an inductor error) the steps stay eager.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as shapes_config

from inference_svc.model.paged.kv_pool import PagedStep
from inference_svc.model.paged.lean_forward import Architecture, lean_decode

# the numbers of rows that get a graph of their own: 1, and 2 for every count above
WARM_ROWS = (1, 2)
# a padding row's length at warm-up: reads of 2 keys, not 1, whose size torch would
# specialize the graph on
WARM_LENGTH = 1


class CompiledDecode:
    """`lean_decode` compiled once for any batch, context and pool size, for the decoder
    it was warmed on. Another decoder (one reloaded after an offload is a new object)
    steps eagerly rather than wait, mid-stream, for graphs of its own."""

    def __init__(self, decoder: nn.Module) -> None:
        self._decoder = weakref.ref(decoder)
        # not fullgraph: a recompile past dynamo's limit runs the step eagerly, not fails it
        self._step = torch.compile(lean_decode, dynamic=True)

    def serves(self, decoder: nn.Module) -> bool:
        return self._decoder() is decoder

    def __call__(self, decoder: nn.Module, architecture: Architecture, step: PagedStep,
                 embeds: torch.Tensor) -> torch.Tensor:
        # while a graph is traced: sizes that happen to be equal (2 rows over 2 keys) stay
        # separate symbols, so that the graph does not hold only while they stay equal;
        # the layers' float constants (norm epsilons, attention scales) are compiled in,
        # not passed as tensors made anew at every step
        with shapes_config.patch(use_duck_shape=False), \
                dynamo_config.patch(specialize_float=True):
            return self._step(decoder, architecture, step, embeds)


def warm(decode: Callable[[list[list[int]], list[int], list[int]], torch.Tensor],
         token: int) -> None:
    """Run `decode(tables, lengths, tokens)` once for each of `WARM_ROWS` with padding
    rows only (an empty block table reads and writes the pool's null block), so that
    every graph a step can need is compiled before the first request."""
    for rows in WARM_ROWS:
        decode([[]] * rows, [WARM_LENGTH] * rows, [token] * rows)
