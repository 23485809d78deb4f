"""How many CPU threads the model loop's torch work gets, pass by pass.

While tokens stream, the server's gRPC and event-loop threads (and, on a shared host,
the clients) need a core of their own; torch's intra-op pool spread over every core then
waits at each parallel region for the slowest, busy one. The embedded default on 2 CPU
cores, 16 streams: 18-22 tok/s with both cores for torch, 26-29 with one. Decode passes
(a few rows) gain nothing from the second core even on a quiet machine; a prefill pass
while nothing streams does (1.5x on a 128-token pass), so it keeps every core. vLLM's
CPU backend likewise leaves cores to its frontend.
"""

from __future__ import annotations

import torch

# torch's own choice (physical cores, or OMP_NUM_THREADS), read before any loop changes it
TORCH_DEFAULT_THREADS = torch.get_num_threads()


class ComputeThreads:
    """Sets torch's intra-op threads for the next pass: `pinned` always when given, else
    every core while nothing streams and one fewer while anything does. The count is the
    calling thread's (OpenMP's), so only the model loop's own work is affected."""

    def __init__(self, pinned: int | None, cores: int = TORCH_DEFAULT_THREADS) -> None:
        self.cores = cores
        self.pinned = pinned
        self.current: int | None = None

    def wanted(self, streaming: bool) -> int:
        if self.pinned is not None:
            return self.pinned
        return max(1, self.cores - 1) if streaming else self.cores

    def for_pass(self, streaming: bool) -> None:
        threads = self.wanted(streaming)
        if threads != self.current:  # a change costs about a millisecond
            torch.set_num_threads(threads)
            self.current = threads
