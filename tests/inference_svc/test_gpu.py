"""CUDA tiers and multi-GPU placement: skipped without CUDA, run where a GPU exists."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.model.checkpoints.placement import plan_placement
from inference_svc.model.modular import ModularModel

pytestmark = pytest.mark.gpu


def test_moving_an_encoder_off_the_gpu_frees_its_allocator_bytes(tiny_bundle):
    model = ModularModel(tiny_bundle, dtype=torch.float16,
                         placement=plan_placement("cuda:0"))
    vision = model.encoders["image"]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    size = vision.state().weight_bytes
    freed = vision.move_to("cpu")
    torch.cuda.synchronize()
    assert freed == size
    assert before - torch.cuda.memory_allocated(0) >= 0.9 * size
    with vision.use() as module:  # back on its home GPU on demand
        assert next(module.parameters()).device.type == "cuda"


def test_cpu_tier_is_pinned_on_cuda_hosts(tiny_bundle):
    model = ModularModel(tiny_bundle, dtype=torch.float16,
                         placement=plan_placement("cuda:0"))
    vision = model.encoders["image"]
    vision.move_to("cpu")
    module = vision._module
    assert all(p.is_pinned() for p in module.parameters())


def test_generation_on_gpu_in_bfloat16(tiny_bundle):
    import asyncio

    from inference_svc.engine.engine import Engine, EngineConfig
    from inference_svc.types import ChatMessage, GenerationRequest, SamplingParams, TextPart

    model = ModularModel(tiny_bundle, dtype=torch.bfloat16, placement=plan_placement("cuda:0"))
    engine = Engine(model, EngineConfig())
    engine.start()

    async def generate():
        handle = await engine.submit(GenerationRequest(
            "gpu", [ChatMessage("user", [TextPart("hello")])],
            SamplingParams(max_new_tokens=8, min_new_tokens=8)))
        return [e async for e in handle.events()][-1]

    try:
        final = asyncio.run(generate())
    finally:
        engine.stop()
    assert final.usage.completion_tokens == 8


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_auto_placement_spreads_the_decoder_and_pins_encoders_to_the_last_card(tiny_bundle):
    placement = plan_placement("auto", kv_reserve_fraction=0.3)
    assert placement.sharded and placement.encoder_device == f"cuda:{torch.cuda.device_count() - 1}"
    model = ModularModel(tiny_bundle, dtype=torch.float16, placement=placement)
    decoder_devices = model.decoder_unit.state().bytes_by_device
    assert all(d.startswith("cuda") for d in decoder_devices)
    assert set(model.encoders["image"].state().bytes_by_device) == {placement.encoder_device}


def test_idle_session_kv_offloads_to_the_host_and_returns_on_reuse(tiny_bundle):
    """An offload trim copies an idle session's blocks to host memory (the account shows
    them swapped); its next turn swaps them back in and reuses them."""
    from tests.unit.engine_runs import outcome, request

    model = ModularModel(tiny_bundle, dtype=torch.float32, placement=plan_placement("cuda:0"))
    engine = Engine(model, EngineConfig())
    engine.start()
    first = replace(request("a session's first turn, long enough to fill blocks " * 3, 6),
                    session_id="s")
    try:
        asyncio.run(outcome(engine, first))
        result = engine.trim_kv("offload", 0, 0)
        assert result.sessions == ["s"] and result.freed_bytes > 0
        assert engine.kv_account().swapped_bytes > 0
        second = replace(first, request_id="turn-2")
        finished = asyncio.run(outcome(engine, second))
        assert finished.usage.cached_prompt_tokens > 0
        assert engine.kv_account().swapped_bytes == 0
    finally:
        engine.stop()


def test_the_paged_engine_preempts_through_pinned_host_memory_and_loses_nothing(tiny_bundle):
    """On CUDA the block pool lives on the GPU and a preempted sequence's blocks are
    copied to pinned host memory and back; greedy output matches a run with room."""
    from tests.unit.test_engine_paged import preemption_runs

    model = ModularModel(tiny_bundle, dtype=torch.float32, placement=plan_placement("cuda:0"))
    runs = preemption_runs(model, chunk=8)
    assert runs.tight.ledger.pool.keys[0].device.type == "cuda"
    assert runs.tight.swaps > 0
    assert all(final.usage.completion_tokens == 48 for _, final in runs.got)
    assert [text for text, _ in runs.got] == [text for text, _ in runs.expected]


def test_decode_steps_replayed_as_cuda_graphs_give_the_eager_steps_output(tiny_bundle):
    """One sequence, then five (a row bucket of eight: three padding rows) growing across
    a key bucket boundary, after the KV pool has grown under the first round's graphs:
    greedy text through captured graphs equals eager steps'."""
    from tests.unit.test_engine_paged import greedy, run, started

    model = ModularModel(tiny_bundle, dtype=torch.float32, placement=plan_placement("cuda:0"))
    first = [greedy("first", "Tell me about the sea", 20)]
    requests = [greedy(f"g{i}", "Tell me about the sea " * (1 + 10 * i), 40 + 10 * i)
                for i in range(5)]
    texts = {}
    for graphs in (False, True):
        engine = started(model, cuda_graphs=graphs)
        try:
            texts[graphs] = [text for text, _ in run(engine, first) + run(engine, requests)]
        finally:
            engine.stop()
        assert (model.decode_graphs is not None) is graphs
    assert model.decode_graphs.captures >= 2
    assert texts[True] == texts[False]


def test_the_pool_is_sized_and_every_row_bucket_captured_before_the_first_request(tiny_bundle):
    """On a GPU the KV pool is allocated once at start-up and a decode graph is captured
    for each row bucket at the first key bucket: requests within them capture nothing and
    the pool never grows (nor do its graphs drop)."""
    from tests.unit.test_engine_paged import greedy, run, started

    model = ModularModel(tiny_bundle, dtype=torch.float32, placement=plan_placement("cuda:0"))
    engine = started(model, cuda_graphs=True, max_batch=8, kv_budget_bytes=64 << 20)
    try:
        capacity = engine.ledger.pool.capacity
        assert capacity == engine.ledger.budget_blocks > 2
        assert model.decode_graphs.captures == 4  # rows 1, 2, 4 and 8
        texts = run(engine, [greedy(f"s{i}", "Hello there", 20) for i in range(3)])
        assert all(text for text, _ in texts)
        assert model.decode_graphs.captures == 4
        assert engine.ledger.pool.capacity == capacity
    finally:
        engine.stop()


def test_an_int8_decoder_decodes_the_same_through_cuda_graphs_as_eagerly(tiny_bundle):
    """torchao's int8 weights are tensor subclasses under F.linear: the captured decode
    steps replay them and give the eager steps' greedy text."""
    from inference_svc.model.precision import resolve_precision
    from tests.unit.test_engine_paged import greedy, run, started

    precision = resolve_precision("--decoder-weights", "int8", torch.bfloat16, ["cuda:0"])
    model = ModularModel(tiny_bundle, dtype=torch.bfloat16, placement=plan_placement("cuda:0"),
                         decoder_weights=precision)
    assert model.decoder_unit.state().precision == "int8"
    requests = [greedy(f"q{i}", "Tell me about the sea " * (1 + 5 * i), 24) for i in range(3)]
    texts = {}
    for graphs in (False, True):
        engine = started(model, cuda_graphs=graphs)
        try:
            texts[graphs] = [text for text, _ in run(engine, requests)]
        finally:
            engine.stop()
    assert model.decode_graphs.captures >= 1
    assert texts[True] == texts[False]


@pytest.mark.parametrize("name", ["int8", "int4", "fp8"])
def test_quantized_linears_replay_in_a_cuda_graph_close_to_bfloat16(name):
    from inference_svc.model.precision import (
        UnsupportedPrecision,
        quantize_linears,
        resolve_precision,
    )

    try:
        precision = resolve_precision("--decoder-weights", name, torch.bfloat16, ["cuda:0"])
    except UnsupportedPrecision as error:
        pytest.skip(str(error))
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(512, 1024, bias=False), torch.nn.SiLU(),
                                 torch.nn.Linear(1024, 512, bias=False))
    layers = layers.to("cuda:0", torch.bfloat16)
    x = torch.randn(16, 512, device="cuda:0", dtype=torch.bfloat16)
    with torch.inference_mode():
        reference = layers(x)
        quantize_linears(layers, precision)
        assert type(layers[0].weight).__name__ != "Parameter"
        eager = layers(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layers(x)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = layers(x)
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
    error = (eager.float() - reference.float()).norm() / reference.float().norm()
    assert error < 0.1


def test_glm4v_layers_over_cuda0_and_cpu_decode_as_on_one_device(tmp_path):
    """The two-card pipeline placement exercised on one GPU: the first half of the
    decoder's layers (and their KV) on cuda:0, the rest on the host; greedy replies equal
    the model's on cuda:0 alone."""
    from inference_svc.model.glm4v import Glm4vModel
    from tests.fixtures.tiny_models import write_tiny_glm4v_checkpoint
    from tests.inference_svc.test_glm4v import image_replies

    checkpoint = write_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    whole = Glm4vModel(checkpoint, device="cuda:0")
    split = Glm4vModel(checkpoint, device="cuda:0", layer_devices=("cuda:0", "cpu"))
    layers = split.checkpoint_config.config.text_config.num_hidden_layers
    pool = split.new_kv_pool(block_size=16, blocks=1)
    assert pool.layer_devices == ["cuda:0"] * (layers - layers // 2) + ["cpu"] * (layers // 2)
    assert image_replies(split) == image_replies(whole)
