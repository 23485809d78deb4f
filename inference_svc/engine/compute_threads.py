"""How many CPU threads torch work gets, thread by thread.

The model loop computes on every core (or a pinned count); every other thread that
touches tensors (the event loop, the executor that decodes media and loads the model)
computes on one. The reason is libgomp: it keeps a pool of workers for each thread that
ever ran a parallel region, and once the pools together hold more threads than there
are cores it stops letting idle workers spin, so each of the loop's parallel regions
waits for a sleeping worker to wake: about 0.1 ms on the 2-core machine against a few
microseconds, and a decode step of the embedded default runs some 450 regions. With the
pools kept to the loop's own, its passes gain from every core even while tokens stream
(16 streams on 2 cores: 46.6 against 38.0 tok/s with a core left to the server).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import torch

# torch's own choice (physical cores, or OMP_NUM_THREADS), read before any thread changes it
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def use_compute_threads(pinned: int | None) -> int:
    """Give the calling thread (the model loop's) `pinned` torch threads, else every
    core torch uses by default; returns the count."""
    threads = pinned or TORCH_DEFAULT_THREADS
    _set_for_this_thread(threads)
    return threads


def torch_on_one_thread() -> None:
    """Run the calling thread's torch work on one CPU thread."""
    _set_for_this_thread(1)


def _set_for_this_thread(threads: int) -> None:
    # torch's first use in a thread sets that thread's count to the last one set in any
    # thread, undoing an earlier set_num_threads: have that first use happen before
    torch.get_num_threads()
    torch.set_num_threads(threads)


def leave_cores_to_the_model_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The event loop's thread, and the threads of its default executor (asyncio.to_thread),
    compute on one CPU thread each. Call from the loop's thread before any tensor work."""
    torch_on_one_thread()
    loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="aside",
                                                 initializer=torch_on_one_thread))
