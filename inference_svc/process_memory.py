"""Process-level memory readings and the allocator release that makes them honest."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_malloc_trim = getattr(_libc, "malloc_trim", None)


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def host_memory_bytes() -> int:
    """Physical memory of the host."""
    return _PAGE * os.sysconf("SC_PHYS_PAGES")


def release_freed_memory() -> None:
    """Collect garbage and hand freed memory back: CUDA caches, and glibc's heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if _malloc_trim is not None:
        _malloc_trim(0)


def freeze_startup_objects() -> int:
    """Move every object alive now (imports, the loaded model) out of the collector's
    view, then collect; returns how many were frozen. Call once, after start-up.

    CPython runs a full (generation 2) collection only when the objects that reached
    generation 2 since the last one exceed a quarter of those that were there then. The
    ~390k objects that torch and transformers leave after import make that tens of
    thousands of survivors, so the reference cycles of finished requests (the model
    loop's streamer <-> emit closure holds the Job, its decoded images and audio) waited
    in generation 2 for minutes: on the soak's tiny bundle RSS grew ~25 MB/min and 20-80
    finished Jobs were alive at any time. Frozen, they no longer count, the full
    collection runs every tenth generation-1 collection, and it scans only the service's
    own objects. Objects frozen here are never collected if they later become cyclic
    garbage (refcounting still frees the rest); start-up state lives as long as the
    process anyway.
    """
    gc.freeze()
    gc.collect()  # resets the long-lived total from which the next full collection is due
    return gc.get_freeze_count()


def cuda_devices() -> list[str]:
    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
