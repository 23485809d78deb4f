"""autoglm-plan: the memory plan from config files and safetensors headers only, on the
tiny bundles, the tiny GLM-4.1V checkpoints and a config.json with GLM-4.1V-9B's real
dimensions (AutoGLM-Phone-9B's architecture), written here without any weights."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from inference_svc.model.cli.plan import main
from tests.fixtures.tiny_models import (
    write_tiny_glm4v_checkpoint,
    write_tiny_phone_glm4v_checkpoint,
)

GIB = 1024**3

# GLM-4.1V-9B-Thinking's config.json, the dimensions that matter for memory.
GLM41V_9B = {
    "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
    "image_token_id": 151343, "video_token_id": 151344, "image_start_token_id": 151339,
    "image_end_token_id": 151340, "video_start_token_id": 151341,
    "video_end_token_id": 151342, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "glm4v_text", "vocab_size": 151552, "hidden_size": 4096,
        "intermediate_size": 13696, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 2, "max_position_embeddings": 65536, "attention_bias": True,
        "rms_norm_eps": 1e-05, "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]},
    },
    "vision_config": {
        "model_type": "glm4v", "hidden_size": 1536, "depth": 24, "num_heads": 12,
        "attention_bias": False, "intermediate_size": 13696, "hidden_act": "silu",
        "image_size": 336, "patch_size": 14, "out_hidden_size": 4096, "rms_norm_eps": 1e-05,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
    },
}


def run_plan(*args: str) -> dict:
    out = io.StringIO()
    assert main([*args, "--json"], out) == 0
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def glm41v_9b_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("glm41v-9b")
    (directory / "config.json").write_text(json.dumps(GLM41V_9B))
    return directory


def test_glm41v_9b_on_one_80gb_card(glm41v_9b_config: Path) -> None:
    plan = run_plan("--model-dir", str(glm41v_9b_config), "--gpus", "1",
                    "--gpu-memory-gib", "80", "--kv-budget-mb", "51200")
    assert plan["weights_source"].startswith("config.json")
    assert plan["parameters"]["decoder"] == 9_400_279_040
    assert plan["parameters"]["vision"] == 892_498_432
    assert plan["weights_by_device"] == {"cuda:0": 2 * (9_400_279_040 + 892_498_432)}
    assert plan["kv_bytes_per_token_per_layer"] == 2 * 2 * 128 * 2
    assert plan["kv_bytes_per_token"] == 40_960
    assert plan["kv_capacity_tokens"] == 51_200 * 1024**2 // 40_960 == 1_310_720
    assert plan["image_tokens_per_screenshot"] == 3_354  # the processor's own max_pixels
    assert plan["kv_bytes_per_session"] == 25_480 * 40_960
    assert plan["concurrent_sessions"] == 51


def test_glm41v_9b_on_the_reference_two_24gb_cards(glm41v_9b_config: Path) -> None:
    plan = run_plan("--model-dir", str(glm41v_9b_config), "--gpus", "2",
                    "--gpu-memory-gib", "24", "--max-pixels", "5000000")
    weights = 2 * (9_400_279_040 + 892_498_432)
    # the service keeps a GLM-4.1V checkpoint whole on the encoders' (last) card
    assert plan["weights_by_device"] == {"cuda:0": 0, "cuda:1": weights}
    assert plan["kv_device"] == "cuda:1"
    free = 24 * GIB - weights - 1024**3
    assert plan["kv_free_bytes"] == plan["kv_budget_bytes"] == free
    assert plan["kv_capacity_tokens"] == free // 40_960
    assert plan["concurrent_sessions"] == free // 40_960 // 25_480 == 3
    assert plan["image_tokens_per_screenshot"] == 3_108


def test_tiny_phone_glm4v_reads_its_headers_and_processor(tmp_path: Path) -> None:
    directory = write_tiny_phone_glm4v_checkpoint(tmp_path / "phone")
    plan = run_plan("--model-dir", str(directory), "--gpus", "0", "--gpu-memory-gib", "4",
                    "--dtype", "float32", "--context", "1000")
    assert plan["weights_source"] == "safetensors headers"
    assert set(plan["weights_by_device"]) == {"cpu"}
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # 2 layers, 2 KV heads x 32
    assert plan["image_tokens_per_screenshot"] == 3_354
    assert plan["concurrent_sessions"] == plan["kv_capacity_tokens"] // 1000


def test_tiny_glm4v_uses_its_own_small_image_geometry(tmp_path: Path) -> None:
    directory = write_tiny_glm4v_checkpoint(tmp_path / "tiny")
    plan = run_plan("--model-dir", str(directory), "--gpus", "1", "--gpu-memory-gib", "1")
    # its processor allows 64x64 px over two temporal frames, 4-px patches, 2x2 merge:
    # so a screenshot is at most half of an 8x8-token frame
    assert 0 < plan["image_tokens_per_screenshot"] <= (64 // 8) ** 2 // 2


def test_tiny_bundle_spreads_the_decoder_and_puts_encoders_last(tiny_bundle: Path) -> None:
    plan = run_plan("--model-dir", str(tiny_bundle), "--gpus", "2", "--gpu-memory-gib", "1",
                    "--kv-budget-mb", "16")
    weights = plan["weights_bytes"]
    assert set(weights) == {"decoder", "vision", "audio"}
    assert sum(plan["weights_by_device"].values()) == sum(weights.values())
    assert plan["weights_by_device"]["cuda:1"] == weights["vision"] + weights["audio"]
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # bf16: 2 layers, 2 x 16
    assert plan["kv_capacity_tokens"] == 16 * 1024**2 // plan["kv_bytes_per_token"]
    assert plan["image_tokens_per_screenshot"] == 4  # 64 px / 16 px = 4x4 patches, 2x2 merge


def test_text_output_and_bad_arguments(tiny_bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main(["--model-dir", str(tiny_bundle), "--gpus", "1"], out) == 0
    assert "KV per token:" in out.getvalue() and "phone-agent sessions" in out.getvalue()
    assert main(["--model-dir", str(tmp_path)], io.StringIO()) == 2
    assert "autoglm-plan: error:" in capsys.readouterr().err
