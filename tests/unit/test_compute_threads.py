"""Torch's CPU threads: every core (or a pinned count) for the model loop, one for each
of the server's other threads."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from inference_svc.engine.compute_threads import (
    TORCH_DEFAULT_THREADS,
    leave_cores_to_the_model_loop,
    use_compute_threads,
)
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.types import ChatMessage, GenerationRequest, SamplingParams, TextPart


@pytest.fixture(autouse=True)
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_compute_threads_must_be_positive():
    with pytest.raises(ValueError, match="compute threads"):
        EngineConfig(compute_threads=0)


def passes_thread_counts(model, monkeypatch, config: EngineConfig) -> dict[str, set[int]]:
    """torch's thread count is per thread (OpenMP's), so it is read where the work runs:
    inside the model's own passes, on the loop's thread."""
    seen: dict[str, set[int]] = {"prefill": set(), "decode": set()}

    def counted(kind: str, forward):
        def run(*args, **kwargs):
            seen[kind].add(torch.get_num_threads())
            return forward(*args, **kwargs)
        return run

    monkeypatch.setattr(model, "forward_paged", counted("prefill", model.forward_paged))
    monkeypatch.setattr(model, "decode_paged", counted("decode", model.decode_paged))
    engine = Engine(model, config)
    engine.start()

    async def generate() -> None:
        handle = await engine.submit(GenerationRequest(
            "threads", [ChatMessage("user", [TextPart("hello")])],
            SamplingParams(max_new_tokens=6, min_new_tokens=6)))
        async for _ in handle.events():
            pass

    try:
        asyncio.run(generate())
    finally:
        engine.stop()
    return seen


def test_the_loop_prefills_and_decodes_with_every_core(model, monkeypatch):
    torch.set_num_threads(1)  # the submitting thread's count is not the loop's
    seen = passes_thread_counts(model, monkeypatch, EngineConfig())
    assert seen == {"prefill": {TORCH_DEFAULT_THREADS}, "decode": {TORCH_DEFAULT_THREADS}}


def test_a_pinned_count_holds_for_every_pass(model, monkeypatch):
    seen = passes_thread_counts(model, monkeypatch, EngineConfig(compute_threads=3))
    assert seen == {"prefill": {3}, "decode": {3}}


def test_the_event_loop_and_its_executor_compute_on_one_thread():
    counts: dict[str, int] = {}

    def serve() -> None:
        async def main() -> None:
            leave_cores_to_the_model_loop(asyncio.get_running_loop())
            # the model loop starts: torch's count for threads not yet started becomes 2
            model_loop = threading.Thread(target=use_compute_threads, args=(2,))
            model_loop.start()
            model_loop.join()
            counts["event loop"] = torch.get_num_threads()
            counts["executor"] = await asyncio.to_thread(torch.get_num_threads)
        torch.set_num_threads(2)
        asyncio.run(main())

    thread = threading.Thread(target=serve)  # its own thread: pytest's keeps its count
    thread.start()
    thread.join()
    assert counts == {"event loop": 1, "executor": 1}
