"""The compiled host decode step (model/paged/host_compile.py): the lean step's logits
and KV from a few graphs for every batch size and context; warmed before the first
request; eager where compiling fails or the decoder is not the one it was warmed on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from inference_svc.model import int8_rows
from inference_svc.model.modular import ModularModel
from inference_svc.model.paged.host_compile import CompiledDecode
from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.model.paged.lean_forward import ARCHITECTURES
from inference_svc.model.precision import WeightPrecision
from tests.unit.test_lean_forward import decode_steps, in_weights, our_step, tiny_decoder


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's graphs and counters start empty: graphs are kept per function (and limited
    in number), whichever test compiled it."""
    torch.compiler.reset()
    counters.clear()
    yield
    torch.compiler.reset()


@pytest.fixture
def model(tiny_bundle) -> ModularModel:
    """A model of its own for each test: one a test compiled would step compiled in the
    next, whose eager reference would then not be eager."""
    return ModularModel(tiny_bundle)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_compiled_steps_give_the_lean_steps_logits_and_kv_from_three_graphs(weights):
    # sandwich norms, mrope, the host's int8 rows or int4 groups
    decoder = in_weights(tiny_decoder("glm4v"), weights)
    compiled = CompiledDecode(decoder)
    ours, our_pool = decode_steps(
        decoder, lambda d, step, embeds: compiled(d, ARCHITECTURES[type(d)], step, embeds))
    # 16 steps of 1, 2 and 3 rows over 1 to 16 keys: one graph for a row over one key
    # (a prompt-less first step, which the engine never takes), one for a row over any
    # number, one for more rows; no graph per step
    assert counters["stats"]["unique_graphs"] == 3
    theirs, their_pool = decode_steps(decoder, our_step)
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        torch.testing.assert_close(a, b, msg=f"step {index}")
    for mine, reference in zip([*our_pool.keys, *our_pool.values],
                               [*their_pool.keys, *their_pool.values], strict=True):
        torch.testing.assert_close(mine, reference)


def zeroed_pool(model: ModularModel) -> KVPool:
    """A pool whose unwritten slots read as zeros, not as whatever memory held (a step
    over them could give NaN, which no two runs compare equal on)."""
    pool = model.new_kv_pool(block_size=16, blocks=4)
    for store in (*pool.keys, *pool.values):
        store.zero_()
    return pool


def test_warm_up_compiles_every_graph_a_step_needs_and_failure_leaves_steps_eager(
        model: ModularModel):
    pool = zeroed_pool(model)
    with model.decoder_unit.use() as decoder:
        reference = model.decode_paged(pool, [[1]], [3], [40])

    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",),
                                       "fx_graph_cache": False}):
        assert not model.compile_host_steps(pool)
    assert model._compiled_decode is None
    assert torch.equal(model.decode_paged(pool, [[1]], [3], [40]), reference)

    assert model.compile_host_steps(pool)
    assert counters["stats"]["unique_graphs"] == 2  # one row, and any other count
    compiled = model._compiled_decode
    assert compiled is not None and compiled.serves(decoder)
    assert not compiled.serves(tiny_decoder("llama"))  # a reloaded decoder steps eagerly
    torch.testing.assert_close(model.decode_paged(pool, [[1]], [3], [40]), reference)
    # a step of three rows at another context length takes the graphs warm-up compiled
    model.decode_paged(pool, [[1], [2], [3]], [3, 20, 7], [40, 41, 42])
    assert counters["stats"]["unique_graphs"] == 2


def test_a_compiled_step_that_fails_runs_eagerly_and_steps_stay_eager(model: ModularModel):
    pool = zeroed_pool(model)
    eager = model.decode_paged(pool, [[1]], [3], [40])
    assert model.compile_host_steps(pool)
    torch.compiler.reset()  # the graphs are gone: the next step compiles again
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",),
                                       "fx_graph_cache": False}):
        assert torch.equal(model.decode_paged(pool, [[1]], [3], [40]), eager)
    assert model._compiled_decode is None
    assert torch.equal(model.decode_paged(pool, [[1]], [3], [40]), eager)


def test_an_int8_step_wider_than_the_int8_kernels_limit_takes_the_warmed_graphs(
        tiny_bundle, monkeypatch):
    """Eagerly, an int8 layer of more rows than `PACKED_ROWS` multiplies by its weight
    dequantized; compiled, a step of any width takes the int8 kernel, so that passing the
    limit compiles no graph on the request path."""
    monkeypatch.setattr(int8_rows, "PACKED_ROWS", 2)
    model = ModularModel(tiny_bundle, decoder_weights=WeightPrecision("int8", torch.float32))
    pool = zeroed_pool(model)
    tables, lengths, tokens = [[1], [2], [3]], [3, 20, 7], [40, 41, 42]
    eager = model.decode_paged(pool, tables, lengths, tokens)
    assert model.compile_host_steps(pool)
    compiled = model.decode_paged(pool, tables, lengths, tokens)
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.02)  # bf16 activations
