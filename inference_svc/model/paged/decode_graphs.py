"""Decode steps replayed as captured CUDA graphs.

An eager decode step of a 9B decoder launches a few thousand small kernels, one after
another from Python; on an H100 the GLM-4.1V-9B step took 70 ms of host time against
6.3 ms of weight reads (tests/bench/gpu_glm4v.py), and the same layers of a 0.5B
decoder replayed as a graph took 5.2x less time than eager (tests/bench/
gpu_step_overhead.py). vLLM and SGLang capture their decode step per batch size for the
same reason.

A graph replays fixed shapes at fixed addresses, so a step is captured per (rows, keys)
bucket (every row bucket at the first key bucket at start-up, the rest as contexts reach
them): rows rounded up to a power of two (padding rows feed the placeholder token,
attend to one null slot and write into the null block, whose contents nothing reads
unmasked), keys rounded up to a multiple of KEY_BUCKET (masked like any padding). The
step's inputs (token ids, positions, mask, slots) are copied into the bucket's static
tensors before each replay. Graphs are dropped when the pool is reallocated or the
decoder's weights move (offload and reload), since both change the addresses captured.
A step that cannot be captured raises CaptureFailed, and the model steps eagerly from
then on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from inference_svc.model.paged.kv_pool import KVPool, PagedStep

log = structlog.get_logger(__name__)

KEY_BUCKET = 256
MAX_GRAPHS = 32  # the least recently used beyond this are dropped (their memory with them)

# runs the decoder on a step and its token embeddings [rows, 1, hidden]: logits [rows, vocab]
Runner = Callable[[PagedStep, torch.Tensor], torch.Tensor]


def row_bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


def key_bucket(keys: int) -> int:
    return -(-keys // KEY_BUCKET) * KEY_BUCKET


class CaptureFailed(RuntimeError):
    """A decode step could not be captured (an operation a graph cannot hold)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    step: PagedStep  # its tensors are the graph's static inputs
    tokens: torch.Tensor  # [rows]
    logits: torch.Tensor  # [rows, vocab], written by each replay


class DecodeGraphs:
    """The captured decode steps of one decoder over one KV pool on one CUDA device."""

    def __init__(self, device: str, max_rows: int) -> None:
        self.device = torch.device(device)
        self.max_rows = max_rows
        self._captured: dict[tuple[int, int], _Captured] = {}
        self._addresses: tuple[int, ...] = ()
        self._memory = None  # the graphs' shared memory pool, made at first capture
        self.captures = 0

    @staticmethod
    def usable(pool: KVPool) -> bool:
        """Graphs need the whole pool on one CUDA device."""
        return len(set(pool.layer_devices)) == 1 and pool.layer_devices[0].startswith("cuda")

    def step(self, pool: KVPool, embedding: torch.nn.Module, run: Runner,
             tables: list[list[int]], lengths: list[int], tokens: list[int],
             offsets: list[int] | None, dtype: torch.dtype, pad_token: int) -> torch.Tensor:
        """The step's next-token logits [len(tokens), vocab], from a replay of its bucket's
        graph (captured first if new)."""
        self._forget_if_moved(pool, embedding)
        rows = len(tokens)
        shape = (row_bucket(rows), key_bucket(max(lengths) + 1))
        padding = shape[0] - rows
        host = PagedStep.decode(pool, [*tables, *[[]] * padding], [*lengths, *[0] * padding],
                                dtype, None if offsets is None else [*offsets, *[0] * padding],
                                keys=shape[1])
        captured = self._captured.pop(shape, None) or self._capture(pool, embedding, run, shape,
                                                                     dtype)
        self._captured[shape] = captured  # the most recently used last
        while len(self._captured) > MAX_GRAPHS:
            self._captured.pop(next(iter(self._captured)))
        captured.step.load(host)
        captured.tokens.copy_(torch.tensor([*tokens, *[pad_token] * padding]))
        captured.graph.replay()
        return captured.logits[:rows].clone()

    def capture_ahead(self, pool: KVPool, embedding: torch.nn.Module, run: Runner,
                      dtype: torch.dtype) -> int:
        """Capture every row bucket up to `max_rows` at the first key bucket now (at
        start-up, so that no request waits for them); the graphs captured."""
        self._forget_if_moved(pool, embedding)
        buckets = sorted({row_bucket(rows) for rows in range(1, self.max_rows + 1)})
        for rows in buckets:
            shape = (rows, KEY_BUCKET)
            if shape not in self._captured:
                self._captured[shape] = self._capture(pool, embedding, run, shape, dtype)
        return len(buckets)

    def _forget_if_moved(self, pool: KVPool, embedding: torch.nn.Module) -> None:
        addresses = (embedding.weight.data_ptr(), pool.keys[0].data_ptr(),
                     pool.values[-1].data_ptr(), pool.capacity)
        if addresses != self._addresses:
            self._captured.clear()
            # a memory pool outlives no graph of its own: captures start a new one
            self._memory = None
            self._addresses = addresses

    def _capture(self, pool: KVPool, embedding: torch.nn.Module, run: Runner,
                 shape: tuple[int, int], dtype: torch.dtype) -> _Captured:
        rows, keys = shape
        started = time.perf_counter()
        step = PagedStep.decode(pool, [[]] * rows, [0] * rows, dtype, [0] * rows, keys=keys)
        step.to(self.device)
        tokens = torch.zeros(rows, dtype=torch.long, device=self.device)
        try:
            graph, logits = self._record(lambda: run(step, embedding(tokens)[:, None]))
        except CaptureFailed as error:
            raise CaptureFailed(f"{rows} rows, {keys} keys: {error}") from error
        self.captures += 1
        log.info("decode_graph_captured", rows=rows, keys=keys, graphs=len(self._captured) + 1,
                 seconds=round(time.perf_counter() - started, 3))
        return _Captured(graph, step, tokens, logits)

    def _record(self, forward: Callable[[], torch.Tensor]
                ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`forward` captured as a graph, and the tensor its replays write the logits to."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialisation happens outside the capture
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._memory is None:
            self._memory = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._memory):
                logits = forward()
        except RuntimeError as error:
            raise CaptureFailed(f"decode step: {error}") from error
        return graph, logits
