"""int4 weights on the host: torchao's quantization in groups of 32, multiplied by
PyTorch's CPU int4 kernel through layers of our own, the LM head in int8, and what the
plan counts for them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.prototype.quantization.int4 import Int4OpaqueTensor
from torchao.quantization import quantize_

from inference_svc.model import cpu_features, precision
from inference_svc.model.checkpoints.placement import bytes_by_device
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.host_linears import parameter_count
from inference_svc.model.int4_groups import Int4GroupsLinear, repack_int4_linears
from inference_svc.model.int8_rows import Int8RowsLinear
from inference_svc.model.precision import (
    WeightPrecision,
    quantize_linears,
    resolve_precision,
    with_host_head,
)
from inference_svc.model.sizing.tensors import TensorSpec
from inference_svc.model.sizing.weights import tensor_bytes
from tests.fixtures.tiny_models import tiny_glm_decoder, write_tiny_glm4v_checkpoint

INT4 = WeightPrecision("int4", torch.float32)


def test_int4_on_a_host_without_bf16_units_computes_in_the_modules_floating_type(
        monkeypatch):
    monkeypatch.setattr(cpu_features, "BF16_UNITS", False)
    assert resolve_precision("--decoder-weights", "int4", torch.float32, ["cpu"]) == INT4


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_a_host_int4_linear_multiplies_the_bytes_torchao_made(rows):
    """The layer computes exactly what torchao's own int4 CPU tensor computes (the same
    bytes, the same kernel), within int4's error of the float layer."""
    torch.manual_seed(rows)
    layer = nn.Linear(96, 160)
    float_layer = nn.Linear(96, 160)
    float_layer.load_state_dict(layer.state_dict())
    quantize_(layer, INT4.torchao_config())
    assert isinstance(layer.weight, Int4OpaqueTensor)
    assert layer.weight.block_size == [1, 32]
    x = torch.randn(2, rows, 96)
    weight = layer.weight
    expected = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, 96).bfloat16(), weight.qdata, 32, weight.scale_and_zero,
    ).float().reshape(2, rows, 160) + layer.bias
    qdata = layer.weight.qdata.clone()
    packed = repack_int4_linears(nn.Sequential(layer))
    assert isinstance(packed[0], Int4GroupsLinear)
    assert torch.equal(packed[0].qdata, qdata)  # taken over, not rounded again
    got = packed(x)
    assert got.shape == (2, rows, 160) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)
    reference = float_layer(x)
    assert (got - reference).norm() / reference.norm() < 0.1


def test_a_layer_the_kernel_cannot_pack_keeps_its_float_weight_and_the_plan_agrees():
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(64, 40), nn.Linear(40, 64), nn.Linear(64, 64))
    quantize_linears(layers, INT4)
    # 40 rows (not a multiple of 16), 40 columns (not of 32), then one that packs
    assert [type(layer) for layer in layers] == [nn.Linear, nn.Linear, Int4GroupsLinear]
    for layer in layers:
        spec = TensorSpec("w.weight", (layer.out_features, layer.in_features))
        bias = layer.out_features * 4
        assert bytes_by_device(layer)["cpu"] - bias == tensor_bytes(spec, "int4", "fp32",
                                                                     host=True)


def test_an_int4_decoder_on_the_host_gets_an_int8_head_copy_beside_its_float_table():
    decoder = tiny_glm_decoder(320, tied=True)
    table = decoder.get_input_embeddings().weight
    parameters = sum(p.numel() for p in decoder.parameters())
    hidden = torch.randn(2, 64)
    with torch.no_grad():
        expected = hidden @ table.T
        quantize_linears(decoder.model, INT4)  # as the loader does: the head is kept
        assert isinstance(decoder.model.layers[0].mlp.down_proj, Int4GroupsLinear)
        assert decoder.lm_head.weight is table  # the head is not quantized with the rest
        with_host_head(decoder, INT4)
        assert isinstance(decoder.lm_head, Int8RowsLinear)
        assert decoder.get_input_embeddings().weight is table
        torch.testing.assert_close(decoder.lm_head(hidden), expected, atol=0.05, rtol=0.02)
    # the int8 copy is a buffer, and a packed int4 weight counts its rows x columns
    assert parameter_count(decoder) == parameters


def test_a_head_whose_rows_are_left_unquantized_stays_as_it_was(monkeypatch):
    """A head of a shape the int8 host layer leaves alone keeps its float weight."""
    monkeypatch.setattr(precision, "HOST_HEADS", {"int4": "int4"})
    decoder = tiny_glm_decoder(300)
    head = decoder.lm_head
    with_host_head(decoder, INT4)  # 300 rows: not a multiple of 16
    assert decoder.lm_head is head


def test_a_glm4v_model_on_the_host_runs_in_int4(tmp_path):
    checkpoint = write_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    full = Glm4vModel(checkpoint).decoder_unit.state()
    model = Glm4vModel(checkpoint, decoder_weights=INT4)
    state = model.decoder_unit.state()
    assert state.precision == "int4" and state.parameters == full.parameters
    assert state.weight_bytes < full.weight_bytes
    with model.decoder_unit.use() as decoder:
        layer = decoder.model.language_model.layers[0]
        assert isinstance(layer.mlp.down_proj, Int4GroupsLinear)
        assert isinstance(decoder.lm_head, Int8RowsLinear)
        assert decoder.get_input_embeddings().weight.dtype == torch.bfloat16
        ids = torch.tensor([model.tokenizer.encode("Hello")])
        with torch.no_grad():
            logits = decoder(input_ids=ids).logits
    assert torch.isfinite(logits).all()


def test_a_weight_on_cuda_takes_torchaos_own_int4_configuration(monkeypatch):
    """Off the host the config hands the layer to torchao's Int4WeightOnlyConfig as the
    service used it before int4 ran on a CPU: groups of 128, tinygemm's tile layout."""
    from torchao.quantization import Int4WeightOnlyConfig
    from torchao.quantization.quantize_.workflows import Int4PackingFormat
    from torchao.quantization.transform_module import _QUANTIZE_CONFIG_HANDLER

    seen = []
    monkeypatch.setitem(_QUANTIZE_CONFIG_HANDLER, Int4WeightOnlyConfig,
                        lambda module, config: seen.append(config) or module)
    layer = nn.Linear(256, 64, device="meta")  # any device but the CPU
    quantize_(layer, INT4.torchao_config())
    [config] = seen
    assert config.group_size == 128
    assert config.int4_packing_format == Int4PackingFormat.TILE_PACKED_TO_4D


def test_an_int4_modular_model_decodes_through_the_paged_path_and_reloads_in_int4(
        tiny_bundle):
    from inference_svc.model.modular import ModularModel
    from inference_svc.model.units import DISK
    from tests.unit.test_weight_precision import _greedy_paged

    model = ModularModel(tiny_bundle, decoder_weights=INT4)
    unit = model.decoder_unit
    before = unit.state()
    assert before.precision == "int4"
    prompt = model.tokenizer.encode("Hello, how are you?")
    tokens = _greedy_paged(model, prompt, 6)
    unit.move_to(DISK)
    unit.load()  # a reload quantizes to the same bytes and decodes the same tokens
    assert unit.state().weight_bytes == before.weight_bytes
    with unit.use() as decoder:
        assert any(isinstance(m, Int4GroupsLinear) for m in decoder.modules())
    assert _greedy_paged(model, prompt, 6) == tokens


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_a_quantized_decoder_on_the_host_keeps_its_kv_in_bf16(tiny_bundle, name):
    """Half the KV bytes of a float32 decoder's; attention reads it back in float32, and
    the greedy tokens through the paged prompt and decode paths are the float32 pool's."""
    from inference_svc.model.modular import ModularModel
    from tests.unit.test_weight_precision import _greedy_paged

    model = ModularModel(tiny_bundle, decoder_weights=WeightPrecision(name, torch.float32))
    plain = ModularModel(tiny_bundle)
    assert model.kv_dtype == torch.bfloat16 and plain.kv_dtype == torch.float32
    assert model.kv_bytes_per_token() * 2 == plain.kv_bytes_per_token()
    pool = model.new_kv_pool(block_size=16, blocks=4)
    assert pool.keys[0].dtype == torch.bfloat16
    prompt = model.tokenizer.encode("Hello, how are you?")
    narrow = _greedy_paged(model, prompt, 8)
    model.kv_dtype = torch.float32  # the same decoder over a float32 pool
    assert _greedy_paged(model, prompt, 8) == narrow
