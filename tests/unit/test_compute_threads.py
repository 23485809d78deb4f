"""The model loop's CPU threads: every core while nothing streams, one fewer while
anything does, a pinned count when configured."""

from __future__ import annotations

import asyncio

import pytest
import torch

from inference_svc.engine.compute_threads import TORCH_DEFAULT_THREADS, ComputeThreads
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.types import ChatMessage, GenerationRequest, SamplingParams, TextPart


@pytest.fixture(autouse=True)
def torch_threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "quiet", "streaming"), [(8, 8, 7), (2, 2, 1), (1, 1, 1)])
def test_one_core_is_left_to_the_server_while_anything_streams(cores, quiet, streaming):
    threads = ComputeThreads(None, cores=cores)
    assert (threads.wanted(streaming=False), threads.wanted(streaming=True)) == (quiet, streaming)


def test_a_pinned_count_holds_either_way():
    threads = ComputeThreads(1, cores=2)
    threads.for_pass(streaming=False)
    assert torch.get_num_threads() == 1
    threads.for_pass(streaming=True)
    assert torch.get_num_threads() == 1


def test_compute_threads_must_be_positive():
    with pytest.raises(ValueError, match="compute threads"):
        EngineConfig(compute_threads=0)


def test_the_loop_prefills_alone_with_every_core_and_decodes_with_one_fewer(model, monkeypatch):
    """torch's thread count is per thread (OpenMP's), so it is read where the work runs:
    inside the model's own passes, on the loop's thread."""
    seen: dict[str, list[int]] = {"prefill": [], "decode": []}

    def counted(kind: str, forward):
        def run(*args, **kwargs):
            seen[kind].append(torch.get_num_threads())
            return forward(*args, **kwargs)
        return run

    monkeypatch.setattr(model, "forward_paged", counted("prefill", model.forward_paged))
    monkeypatch.setattr(model, "decode_paged", counted("decode", model.decode_paged))
    engine = Engine(model, EngineConfig())
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
    assert set(seen["prefill"]) == {TORCH_DEFAULT_THREADS}
    assert set(seen["decode"]) == {max(1, TORCH_DEFAULT_THREADS - 1)}
