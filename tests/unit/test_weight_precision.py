"""Weight precision per module: what each flag value means on this machine, the real
bytes of quantized weights, and quantized units running the service's own forwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from inference_svc.model import cpu_features, int8_rows, precision
from inference_svc.model.checkpoints.placement import bytes_by_device
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.host_linears import sibling_outputs
from inference_svc.model.int8_rows import (
    PACKED_ROWS,
    Int8RowsLinear,
    Int8RowsSlice,
    repack_int8_linears,
)
from inference_svc.model.modular import ModularModel
from inference_svc.model.paged.kv_pool import RowSlots
from inference_svc.model.precision import (
    NarrowTable,
    UnsupportedPrecision,
    WeightPrecision,
    quantize_linears,
    resolve_precision,
    with_host_head,
)
from inference_svc.model.units import DISK
from inference_svc.types import ChatMessage, ImagePart, TextPart
from tests.fixtures.tiny_models import tiny_glm_decoder, write_tiny_glm4v_checkpoint

INT8 = WeightPrecision("int8", torch.float32)


def test_auto_keeps_the_dtype_and_floats_name_their_own():
    assert resolve_precision("--decoder-weights", "auto", torch.float32, ["cpu"]) == \
        WeightPrecision("fp32", torch.float32)
    assert resolve_precision("--vision-weights", "bf16", torch.float32, ["cpu"]) == \
        WeightPrecision("bf16", torch.bfloat16)


@pytest.mark.parametrize(("bf16_units", "computes_in"),
                         [(True, torch.bfloat16), (False, torch.float32)])
@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_int8_and_int4_on_a_cpu_compute_in_bf16_where_it_has_bf16_units(
        choice, bf16_units, computes_in, monkeypatch):
    """With AMX or AVX512-BF16 a quantized module computes in bfloat16; elsewhere in the
    module's floating type."""
    monkeypatch.setattr(cpu_features, "BF16_UNITS", bf16_units)
    precision = resolve_precision("--decoder-weights", choice, torch.float32, ["cpu"])
    assert precision == WeightPrecision(choice, computes_in) and precision.quantized


def test_fp8_is_refused_on_a_cpu_naming_the_flag_and_what_runs_there():
    with pytest.raises(UnsupportedPrecision, match=r"^--decoder-weights fp8: cpu .* int8 or int4$"):
        resolve_precision("--decoder-weights", "fp8", torch.float32, ["cpu"])


def test_a_quantized_module_loads_onto_its_cuda_device_to_be_quantized_there():
    assert INT8.placed_on("cuda:1") == {"device_map": {"": "cuda:1"}}
    assert INT8.placed_on("cpu") == {}
    assert WeightPrecision.of(torch.bfloat16).placed_on("cuda:0") == {}  # loads as before


def test_quantized_linears_count_their_real_bytes_and_stay_close():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    x = torch.randn(4, 256)
    before = bytes_by_device(layers)["cpu"]
    expected = layers(x)
    quantize_linears(layers, INT8)
    after = bytes_by_device(layers)["cpu"]
    # on a CPU: int8 data plus a bf16 scale per output row; biases stay fp32
    weights = 2 * 256 * 512
    rows = 512 + 256
    assert after == weights + rows * 2 + rows * 4
    assert after < before / 3
    torch.testing.assert_close(layers(x), expected, atol=0.02, rtol=0.02)


def _greedy_paged(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens through the service's paged forwards (prompt, then decode steps)."""
    block = 16
    pool = model.new_kv_pool(block_size=block, blocks=8)
    table = [1, 2, 3]
    slots = torch.tensor([b * block + i for b in table for i in range(block)])
    tokens = list(prompt)
    n = len(prompt)
    logits = model.forward_paged(pool, [RowSlots(slots[:n], slots[:n])],
                                 [torch.tensor(prompt)])
    for _ in range(steps):
        tokens.append(int(logits[-1].argmax()))
        length = len(tokens) - 1
        logits = model.decode_paged(pool, [table], [length], [tokens[-1]])
    return tokens[len(prompt):]


def test_an_int8_modular_model_decodes_through_the_paged_path_and_reloads_int8(tiny_bundle):
    plain = ModularModel(tiny_bundle)
    quantized = ModularModel(tiny_bundle, decoder_weights=INT8, vision_weights=INT8)
    states = {u.name: u.state() for u in quantized.units}
    assert {n: s.precision for n, s in states.items()} == {
        "decoder": "int8", "vision": "int8", "audio": "fp32"}
    plain_bytes = {u.name: u.state().weight_bytes for u in plain.units}
    assert states["decoder"].parameters == plain.decoder_unit.state().parameters
    assert states["decoder"].weight_bytes < plain_bytes["decoder"]
    assert states["vision"].weight_bytes < plain_bytes["vision"]
    assert states["audio"].weight_bytes == plain_bytes["audio"]
    with quantized.decoder_unit.use() as decoder:
        down = decoder.model.layers[0].mlp.down_proj
        assert isinstance(down, Int8RowsLinear) and down.qdata.dtype == torch.int8
        lookups = decoder.get_input_embeddings()
        table = lookups.weight
        # not quantized: held in bf16, its rows coming out in the decoder's float32
        assert isinstance(lookups, NarrowTable) and table.dtype == torch.bfloat16
        ids = torch.tensor([[1, 5, 9]])
        with plain.decoder_unit.use() as float_decoder, torch.no_grad():
            float_rows = float_decoder.get_input_embeddings()(ids)
        assert lookups(ids).dtype == torch.float32
        assert torch.equal(lookups(ids), float_rows.bfloat16().float())
        # on the host the head is int8 too, and computes what the float head does
        assert isinstance(decoder.lm_head, Int8RowsLinear)
        with plain.decoder_unit.use() as float_decoder, torch.no_grad():
            hidden = torch.randn(1, table.shape[1])
            torch.testing.assert_close(decoder.lm_head(hidden),
                                       float_decoder.lm_head(hidden), atol=0.05, rtol=0.02)
    prompt = quantized.tokenizer.encode("Hello, how are you?")
    tokens = _greedy_paged(quantized, prompt, 6)
    assert len(tokens) == 6
    vision = quantized.encoders["image"]
    vision.move_to(DISK)
    vision.load()
    assert vision.state().weight_bytes == states["vision"].weight_bytes
    assert vision.state().precision == "int8"
    decoder_unit = quantized.decoder_unit
    decoder_unit.move_to(DISK)
    decoder_unit.load()  # a reload holds the same int8 head
    assert decoder_unit.state().weight_bytes == states["decoder"].weight_bytes


def test_a_glm4v_model_on_the_host_quantizes_its_decoder_and_head_but_not_its_tower(
        tmp_path):
    checkpoint = write_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    full = Glm4vModel(checkpoint).decoder_unit.state().parameters
    model = Glm4vModel(checkpoint, decoder_weights=INT8)
    assert model.decoder_unit.state().parameters == full  # the head replaced, not added
    assert {u.name: u.precision for u in model.units} == {"decoder": "int8", "vision": "fp32"}
    with model.decoder_unit.use() as decoder:
        layer = decoder.model.language_model.layers[0]
        assert isinstance(layer.self_attn.q_proj, Int8RowsSlice)  # of q, k and v's rows
        assert isinstance(layer.self_attn.qkv_rows, Int8RowsLinear)
        assert isinstance(decoder.lm_head, Int8RowsLinear)  # untied: quantized in place
        assert decoder.get_input_embeddings().weight.dtype == torch.bfloat16
        assert decoder.get_input_embeddings()(torch.tensor([3])).dtype == torch.float32
    with model.encoders["image"].use() as tower:
        assert all(type(p) is nn.Parameter for p in tower.parameters())
    prompt = model.tokenizer.encode("Hello")
    assert len(_greedy_paged(model, prompt, 3)) == 3


@pytest.mark.parametrize("block_rows", [None, 48])
@pytest.mark.parametrize("bf16_units", [True, False])
@pytest.mark.parametrize("rows", [1, PACKED_ROWS, PACKED_ROWS + 1, 64])
def test_host_int8_linears_multiply_the_int8_bytes_torchao_made(rows, bf16_units, block_rows,
                                                                monkeypatch):
    """Decode-sized inputs take the int8 kernel (bf16 activations), wider ones a bfloat16
    matmul by the weight converted for the call (a float matmul by the dequantized weight
    on a CPU without bfloat16 units), whole or a block of rows at a time (here 48, 48, 48
    and 16 of 160): all equal torchao's own int8 layer."""
    monkeypatch.setattr(int8_rows, "BF16_UNITS", bf16_units)
    if block_rows:
        monkeypatch.setattr(int8_rows, "CONVERTED_ELEMENTS", 96 * block_rows)
    torch.manual_seed(rows)
    layer = nn.Linear(96, 160)
    quantize_(layer, WeightPrecision("int8", torch.float32).torchao_config())
    x = torch.randn(2, rows, 96)
    expected = layer(x)
    qdata = layer.weight.qdata.clone()
    packed = nn.Sequential(layer)
    repack_int8_linears(packed)
    assert isinstance(packed[0], Int8RowsLinear)
    assert torch.equal(packed[0].qdata, qdata)  # the same int8 bytes, not rounded again
    got = packed(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.01)


def test_a_tied_head_on_the_host_becomes_an_int8_copy_beside_the_float_table(monkeypatch):
    monkeypatch.setattr(precision, "HEAD_ROWS_AT_ONCE", 128)  # 300 rows: 128, 128, 44
    decoder = tiny_glm_decoder(300, tied=True)
    table = decoder.get_input_embeddings().weight
    assert decoder.lm_head.weight is table
    parameters = sum(p.numel() for p in decoder.parameters())
    hidden = torch.randn(2, 64)
    with torch.no_grad():
        expected = hidden @ table.T
        whole_source = nn.Linear(64, 300, bias=False)
        whole_source.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
        whole = quantize_linears(whole_source, INT8)
        assert with_host_head(decoder, WeightPrecision.of(torch.float32)) is decoder
        assert decoder.lm_head.weight is table  # a float decoder keeps its tied head
        with_host_head(decoder, INT8)
        assert isinstance(decoder.lm_head, Int8RowsLinear)
        assert decoder.get_input_embeddings().weight is table  # the lookups stay float
        assert table.dtype == torch.float32
        torch.testing.assert_close(decoder.lm_head(hidden), expected, atol=0.05, rtol=0.02)
        # quantized a block of rows at a time, it holds what quantizing it whole gives
        assert torch.equal(decoder.lm_head.qdata, whole.qdata)
        assert torch.equal(decoder.lm_head.scale, whole.scale)
    # the copy is a buffer: the model's parameters are what they were
    assert sum(p.numel() for p in decoder.parameters()) == parameters


def test_a_bare_int8_linear_is_replaced_by_its_host_layer():
    """quantize_linears on a Linear itself (an lm_head made int8) returns the new layer."""
    head = quantize_linears(nn.Linear(64, 300, bias=False), INT8)
    assert isinstance(head, Int8RowsLinear)
    assert head(torch.randn(1, 64)).shape == (1, 300)


@pytest.mark.parametrize("bias", [False, True])
def test_projections_of_one_input_share_their_int8_rows_and_compute_what_they_did(bias):
    """q, k and v (and an MLP's gate and up) become slices of one int8 weight: the same
    bytes, counted once, each projection's output unchanged, all three from one call."""
    torch.manual_seed(3)
    owner = nn.Module()
    for name, rows in (("q_proj", 96), ("k_proj", 32), ("v_proj", 32)):
        setattr(owner, name, nn.Linear(64, rows, bias=bias))
    quantize_(owner, INT8.torchao_config())
    x = torch.randn(1, 3, 64)
    wide = torch.randn(1, PACKED_ROWS + 5, 64)
    before = [owner.q_proj(x), owner.k_proj(x), owner.v_proj(x), owner.q_proj(wide)]
    repack_int8_linears(owner)
    assert all(isinstance(getattr(owner, n), Int8RowsSlice) for n in ("q_proj", "k_proj", "v_proj"))
    assert sum(p.numel() for p in owner.parameters()) == 160 * 64 + 160 * bias  # held once
    after = [owner.q_proj(x), owner.k_proj(x), owner.v_proj(x), owner.q_proj(wide)]
    for got, expected in zip(after, before, strict=True):
        torch.testing.assert_close(got, expected, atol=0.02, rtol=0.01)
    together = sibling_outputs(owner, "qkv_rows", x)
    for got, alone in zip(together, after[:3], strict=True):
        assert torch.equal(got, alone)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_quantized_glm4v_decoder_computing_in_bf16_reads_images_as_in_float32(
        name, tmp_path):
    """Where the CPU has bfloat16 units a quantized decoder computes in bfloat16: the
    screenshot's embeddings (the tower in float32) enter it in its type, the KV pool is
    bfloat16, and the paged prefill and decode steps give the float32-activation model's
    logits within the roundings' error (0.014-0.048 measured; the two decoders quantize
    weights loaded in different types)."""
    from tests.conftest import png_bytes
    from tests.inference_svc.test_glm4v import paged_prefill

    checkpoint = write_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    models = {dtype: Glm4vModel(checkpoint, decoder_weights=WeightPrecision(name, dtype))
              for dtype in (torch.float32, torch.bfloat16)}
    assert models[torch.bfloat16].kv_dtype == torch.bfloat16
    logits = {}
    for dtype, model in models.items():
        messages = [ChatMessage("user", [TextPart("look "), ImagePart(
            png_bytes(), "image/png", "messages[0].parts[1].image"), TextPart(" here")])]
        media = model.decode_media(messages, max_pixels=1_003_520)
        plan = model.plan(messages, media, enable_thinking=False)
        pool = model.new_kv_pool(block_size=16, blocks=len(plan.input_ids) // 16 + 3)
        prompt = paged_prefill(model, pool, plan, media)
        table = list(range(1, len(plan.input_ids) // 16 + 3))
        step = model.decode_paged(pool, [table], [len(plan.input_ids)], [int(prompt.argmax())])
        logits[dtype] = (prompt.float(), step[0].float())
    for ours, reference in zip(logits[torch.bfloat16], logits[torch.float32], strict=True):
        assert torch.isfinite(ours).all()
        assert (ours - reference).norm() / reference.norm() < 0.1
