"""The plan's arithmetic (inference_svc/model/sizing) against independent counts: the
GLM-4.1V-9B tensors computed from its config.json against transformers' own model built on
the meta device and against sums by hand; the quantized byte layouts against what torchao
stores; and the embedded default's planned bytes against what the loaded model reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import Glm4vForConditionalGeneration

from inference_svc.model.checkpoints.glm4v_config import read_glm4v_config
from inference_svc.model.sizing.cards import RESERVE_FRACTION, RUNTIME_BYTES, Cards, layout
from inference_svc.model.sizing.model_spec import read_model
from inference_svc.model.sizing.tensors import glm4v_tensors
from inference_svc.model.sizing.weights import weight_bytes
from memory_daemon.config import PolicyConfig
from tests.fixtures.glm41v_9b import GLM41V_9B
from tests.fixtures.real_glm4v import real_files
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

GIB = 1024**3
# GLM-4.1V-9B, by hand from its config.json: vocabulary V, width H, 40 layers of 32
# query heads and 2 KV heads of 128, MLP width M; the vision tower's 24 blocks of 1536.
V, H, M, LAYERS, KV = 151_552, 4096, 13_696, 40, 2 * 128
LAYER_MATRICES = [(H, H), (KV, H), (KV, H), (H, H), (2 * M, H), (H, M)]  # q k v o gate_up down
LAYER_SMALL = H + KV + KV + 4 * H  # q, k, v biases and four norms
DECODER_PARAMS = 2 * V * H + LAYERS * (sum(o * i for o, i in LAYER_MATRICES) + LAYER_SMALL) + H


def config_dirs(tmp_path: Path) -> list[Path]:
    """GLM-4.1V-9B's config.json in the nested layout, and the real flat file where present."""
    nested = tmp_path / "nested"
    nested.mkdir()
    (nested / "config.json").write_text(json.dumps(GLM41V_9B))
    dirs = [nested]
    files = real_files()
    if files is not None:
        flat = tmp_path / "flat"
        flat.mkdir()
        (flat / "config.json").write_text((files / "config.json").read_text())
        dirs.append(flat)
    return dirs


def test_glm41v_9b_tensors_from_config_are_transformers_own(tmp_path: Path) -> None:
    for directory in config_dirs(tmp_path):
        config = read_glm4v_config(directory).config
        with torch.device("meta"):
            model = Glm4vForConditionalGeneration(config)
        built = {name: tuple(p.shape) for name, p in model.named_parameters()}
        tables = glm4v_tensors(config)
        computed = {t.name: t.shape for tensors in tables.values() for t in tensors}
        assert computed == built
        vision = {t.name for t in tables["vision"]}
        assert vision == {name for name in built if name.startswith("model.visual.")}


def test_glm41v_9b_parameter_counts_by_hand(tmp_path: Path) -> None:
    spec = read_model(config_dirs(tmp_path)[-1], full="bf16")
    counts = spec.tensors.parameters()
    assert counts["decoder"] == DECODER_PARAMS == 9_400_279_040
    # GLM-4-9B's published size is 9.4 B (its decoder); GLM-4.1V-9B-Thinking's model card
    # counts 10.3 B with the vision tower
    assert abs(counts["decoder"] / 9.4e9 - 1) < 0.01
    assert abs((counts["decoder"] + counts["vision"]) / 10.3e9 - 1) < 0.01
    assert spec.kv.bytes_per_token(2) == LAYERS * 2 * KV * 2 == 40_960  # bf16
    assert spec.image_tokens == 3_108  # 1080x2400 at the deployment's 5,000,000 pixels


def int4_bytes(out: int, inp: int) -> int:
    return out * inp // 2 + out * (inp // 128) * 4  # nibbles; bf16 scale and zero per group


def test_glm41v_9b_decoder_bytes_per_precision_by_hand(tmp_path: Path) -> None:
    tensors = read_model(config_dirs(tmp_path)[0], full="bf16").tensors.modules["decoder"]
    # biases, norms, the embedding table and the LM head stay bf16
    small = 2 * (LAYERS * LAYER_SMALL + H) + 2 * 2 * V * H
    matrices = [m for _ in range(LAYERS) for m in LAYER_MATRICES]
    assert weight_bytes(tensors, "bf16", "bf16") == 2 * DECODER_PARAMS
    assert weight_bytes(tensors, "int8", "bf16") == (
        sum(o * i + o * 5 for o, i in matrices) + small)
    assert weight_bytes(tensors, "fp8", "bf16") == (
        sum(o * i + o * 4 for o, i in matrices) + small)
    assert weight_bytes(tensors, "int4", "bf16") == (
        sum(int4_bytes(o, i) for o, i in matrices) + small)


def test_glm41v_9b_on_the_host_in_int4_by_hand(tmp_path: Path) -> None:
    """On the host int4 groups 32 columns, the LM head is int8 (bf16 scales) and the
    token table bf16."""
    tensors = read_model(config_dirs(tmp_path)[0], full="fp32").tensors.modules["decoder"]
    small = 4 * (LAYERS * LAYER_SMALL + H) + 2 * V * H
    matrices = [m for _ in range(LAYERS) for m in LAYER_MATRICES]
    host_int4 = sum(o * i // 2 + o * (i // 32) * 4 for o, i in matrices)
    assert weight_bytes(tensors, "int4", "fp32", host=True) == (
        host_int4 + V * H + V * 2 + small)


def test_a_quantized_decoder_on_the_host_plans_its_kv_in_bf16(tmp_path: Path) -> None:
    spec = read_model(config_dirs(tmp_path)[0], full="fp32")
    host = Cards(0, 64 * GIB)
    assert layout(spec, host, "fp32", "fp32").kv_bytes_per_token == 2 * 40_960  # float32
    for decoder in ("int8", "int4"):
        plan = layout(spec, host, decoder, "int8")
        assert plan.kv_bytes_per_token == 40_960
        assert plan.cards[0].kv_bytes_per_token == 40_960
    # on a GPU the KV stays in the serving type
    assert layout(spec, Cards(1, 80 * GIB), "int4", "int8").kv_bytes_per_token == 2 * 40_960


def test_one_24_gib_card_by_hand(tmp_path: Path) -> None:
    spec = read_model(config_dirs(tmp_path)[0], full="bf16")
    plan = layout(spec, Cards(1, 24 * GIB), "bf16", "bf16")
    # the vision tower's peak for one screenshot, 12,432 patches through SDPA: float32
    # and bf16 patches, the residual stream, and the merger's 3,108 tokens (its widest)
    patches = 12_432
    activations = (patches * 1176 * 6 + 2 * patches * 1536 * 2
                   + patches // 4 * (4 * 1536 + 3 * 13_696 + 4096) * 2)
    assert spec.vision_activation_bytes == activations
    weights = 2 * (9_400_279_040 + 892_498_432)
    reserve = int(24 * GIB * (1 - PolicyConfig().hard_enter))
    free = 24 * GIB - weights - RUNTIME_BYTES - activations - reserve
    [card] = plan.cards
    assert card.free_bytes == free
    assert plan.kv_tokens == free // 40_960
    assert plan.agents(25_480) == free // 40_960 // 25_480 == 1


def test_two_cards_split_the_layers_and_their_kv(tmp_path: Path) -> None:
    spec = read_model(config_dirs(tmp_path)[0], full="bf16")
    plan = layout(spec, Cards(2, 24 * GIB), "bf16", "bf16")
    first, second = plan.cards
    assert (first.layers, second.layers) == ((0, 20), (20, 40))
    layer = 2 * (sum(o * i for o, i in LAYER_MATRICES) + LAYER_SMALL)
    table = 2 * V * H
    # the embedding before layer 0, the final norm and the head after layer 39: the
    # first card has 8 KiB more room, so the vision tower and its activations go there
    assert first.weights == {"decoder": table + 20 * layer, "vision": 2 * 892_498_432}
    assert second.weights == {"decoder": 20 * layer + 2 * H + table}
    assert first.activation_bytes == spec.vision_activation_bytes
    assert second.activation_bytes == 0
    assert first.kv_bytes_per_token == second.kv_bytes_per_token == 20 * 1024
    assert plan.kv_tokens == min(first.free_bytes, second.free_bytes) // (20 * 1024)
    assert plan.kv_budget_bytes == plan.kv_tokens * 40_960


def test_the_reserve_is_what_the_daemon_keeps_above_its_hard_mark() -> None:
    assert pytest.approx(1 - PolicyConfig().hard_enter) == RESERVE_FRACTION


def test_a_config_json_alone_and_its_weights_plan_alike(tmp_path: Path) -> None:
    """A checkpoint with weights is read from its headers; the same config without them
    is computed: the two agree tensor for tensor."""
    checkpoint = write_tiny_phone_glm4v_checkpoint(tmp_path / "phone")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoint / "config.json").read_text())
    headers = read_model(checkpoint, full="bf16").tensors
    computed = read_model(bare, full="bf16").tensors
    assert (headers.source, computed.source) == ("safetensors headers", "config.json")
    for module in ("decoder", "vision"):
        assert ({t.name: t.shape for t in headers.modules[module]}
                == {t.name: t.shape for t in computed.modules[module]})


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's tensors hold, a torchao tensor by its inner tensors."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def size(tensor: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            return sum(size(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(size(t) for t in seen.values())


@pytest.fixture(scope="module")
def default_bundle() -> Path:
    from inference_svc.model.checkpoints.default_bundle import (
        default_cache_dir,
        ensure_default_bundle,
    )

    return ensure_default_bundle(default_cache_dir())


@pytest.mark.slow
def test_planned_bytes_are_what_the_loaded_default_reports(default_bundle: Path) -> None:
    from inference_svc.model.modular import ModularModel

    model = ModularModel(default_bundle, dtype=torch.float32)
    reported = {u.name: u.state().weight_bytes for u in model.units}
    spec = read_model(default_bundle, full="fp32")
    planned = layout(spec, Cards(0, 64 * GIB), "fp32", "fp32").weights
    assert set(planned) == set(reported) == {"decoder", "vision", "audio"}
    # the decoder adds its rotary inverse frequencies (two float32 buffers of 32)
    assert reported["decoder"] - planned["decoder"] == 2 * 32 * 4
    assert reported["vision"] == planned["vision"]
    # the Conformer builds its relative position table at load (the checkpoint lacks
    # it), and its batch norms count their batches in int64, not the serving dtype
    audio = json.loads((default_bundle / "audio" / "config.json").read_text())
    table = (2 * audio["max_source_positions"] - 1) * audio["hidden_size"] * 4
    counters = audio["num_hidden_layers"] * (8 - 4)
    assert reported["audio"] - planned["audio"] == table + counters

    # int8 and int4: the decoder as the service loads it with --decoder-weights reports
    # the planned bytes (and the same rotary buffers)
    from inference_svc.model.precision import WeightPrecision

    del model
    for name in ("int8", "int4"):
        quantized = ModularModel(default_bundle, dtype=torch.float32,
                                 decoder_weights=WeightPrecision(name, torch.float32))
        planned_bytes = layout(spec, Cards(0, 64 * GIB), name, "fp32").weights["decoder"]
        assert quantized.decoder_unit.state().weight_bytes - planned_bytes == 2 * 32 * 4
        del quantized



@pytest.mark.parametrize("name", ["fp32", "int8", "int4"])
def test_the_plans_kv_bytes_a_token_are_what_the_loaded_decoder_keeps(tiny_bundle, name):
    """The plan's KV element (sizing, without torch) and the loaded decoder's KV type
    (model/precision.py `kv_dtype`) are two statements of one rule: they agree for each
    precision the host plans, as the service resolves it."""
    from inference_svc.model.modular import ModularModel
    from inference_svc.model.precision import resolve_precision

    precision = resolve_precision("--decoder-weights", name, torch.float32, ["cpu"])
    model = ModularModel(tiny_bundle, decoder_weights=precision)
    spec = read_model(tiny_bundle, full="fp32")
    planned = layout(spec, Cards(0, 64 * GIB), name, "fp32").kv_bytes_per_token
    assert planned == model.kv_bytes_per_token()
