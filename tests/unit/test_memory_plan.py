"""autoglm-plan: the plan by card size from config files and safetensors headers only, on
the tiny bundles, the tiny GLM-4.1V checkpoints and a config.json with GLM-4.1V-9B's real
dimensions (AutoGLM-Phone-9B's architecture), written here without any weights. The
arithmetic itself is checked by hand in test_sizing.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from inference_svc.model.cli.plan import TABLE_CARDS_GIB, main
from tests.conftest import REPO
from tests.fixtures.glm41v_9b import GLM41V_9B
from tests.fixtures.tiny_models import (
    write_tiny_glm4v_checkpoint,
    write_tiny_phone_glm4v_checkpoint,
)

GIB = 1024**3


def run_plan(*args: str) -> dict:
    out = io.StringIO()
    assert main([*args, "--json"], out) == 0
    return json.loads(out.getvalue())


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    out = io.StringIO()
    assert main(list(args), out) == 2
    assert out.getvalue() == ""
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def glm41v_9b_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("glm41v-9b")
    (directory / "config.json").write_text(json.dumps(GLM41V_9B))
    return directory


def test_glm41v_9b_on_one_80gb_card_keeps_full_precision(glm41v_9b_config: Path) -> None:
    plan = run_plan(str(glm41v_9b_config), "--gpu-memory-gib", "80")
    assert plan["weights_source"] == "config.json"
    assert (plan["decoder_weights"], plan["vision_weights"]) == ("bf16", "bf16")
    assert plan["parameters"] == {"decoder": 9_400_279_040, "vision": 892_498_432}
    assert plan["weights_bytes"] == {"decoder": 2 * 9_400_279_040, "vision": 2 * 892_498_432}
    assert plan["kv_bytes_per_token_per_layer"] == 2 * 2 * 128 * 2
    assert plan["kv_bytes_per_token"] == 40_960
    assert plan["image_tokens_per_screenshot"] == 3_108  # the deployment's max_pixels
    assert plan["context"] == 25_480
    assert plan["kv_bytes_per_agent"] == 25_480 * 40_960
    [card] = plan["cards"]
    assert plan["kv_capacity_tokens"] == card["free_bytes"] // 40_960
    assert plan["longest_context"] == 65_536  # the model's own, not the KV's
    assert plan["agents_at_context"] == plan["kv_capacity_tokens"] // 25_480 == 54


def test_smaller_cards_step_down_the_decoder_first(glm41v_9b_config: Path) -> None:
    chosen = {size: run_plan(str(glm41v_9b_config), "--gpu-memory-gib", size)
              for size in ("24", "16", "12")}
    assert [(p["decoder_weights"], p["vision_weights"]) for p in chosen.values()] == [
        ("bf16", "bf16"), ("int8", "bf16"), ("int4", "bf16")]
    for plan in chosen.values():
        assert plan["agents_at_context"] >= 1
    # a full-precision decoder leaves 24 GiB room for one agent only
    assert chosen["24"]["agents_at_context"] == 1
    assert chosen["24"]["longest_context"] == chosen["24"]["kv_capacity_tokens"] < 65_536


def test_agents_ask_for_a_smaller_precision(glm41v_9b_config: Path) -> None:
    plans = [run_plan(str(glm41v_9b_config), "--gpu-memory-gib", "16", "--agents", agents)
             for agents in ("2", "3", "4")]
    assert [(p["decoder_weights"], p["vision_weights"]) for p in plans] == [
        ("int8", "int8"), ("int4", "bf16"), ("int4", "bf16")]
    for plan, agents in zip(plans, (2, 3, 4), strict=True):
        assert plan["agents_at_context"] >= agents
    out = io.StringIO()
    assert main([str(glm41v_9b_config), "--gpu-memory-gib", "16", "--agents", "4", "--env"],
                out) == 0
    assert out.getvalue().splitlines() == [
        "AUTOGLM_DECODER_WEIGHTS=int4", "AUTOGLM_VISION_WEIGHTS=auto",
        f"AUTOGLM_KV_BUDGET_MB={plans[2]['kv_budget_bytes'] // 1024**2}",
        "AUTOGLM_DEVICE=cuda:0"]


def test_fp8_comes_before_int8_where_the_card_runs_it(glm41v_9b_config: Path) -> None:
    plan = run_plan(str(glm41v_9b_config), "--gpu-memory-gib", "16", "--fp8")
    assert plan["decoder_weights"] == "fp8"
    # 1 byte per weight but the LM head's and embedding's (bf16): well under bf16's 2
    assert plan["weights_bytes"]["decoder"] < 0.6 * 2 * 9_400_279_040


def test_two_24gb_cards_split_the_decoder(glm41v_9b_config: Path) -> None:
    plan = run_plan(str(glm41v_9b_config), "--gpus", "2", "--gpu-memory-gib", "24")
    first, second = plan["cards"]
    assert (first["layers"], second["layers"]) == ([0, 20], [20, 40])
    assert set(first["weights"]) == {"decoder", "vision"}
    assert set(second["weights"]) == {"decoder"}
    assert first["kv_bytes_per_token"] == second["kv_bytes_per_token"] == 20_480
    # the reference article's setup: ~12-14 GB in use on each card before the KV grows
    for card in plan["cards"]:
        in_use = (sum(card["weights"].values()) + card["runtime_bytes"]
                  + card["activation_bytes"])
        assert 10 * GIB < in_use < 14 * GIB
    assert plan["agents_at_context"] == 20


def test_nothing_fits_is_refused_in_plain_words(glm41v_9b_config: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, str(glm41v_9b_config), "--gpu-memory-gib", "8")
    assert err.startswith("autoglm-plan: ")
    assert "does not fit 1 x 8 GiB" in err
    assert "one agent at 25,480 tokens needs 0.97 GiB of KV cache on cuda:0" in err
    assert "decoder int4, vision int8" in err and "short" in err
    assert "a larger card or more cards (--gpus)" in err
    err = refused(capsys, str(glm41v_9b_config), "--gpu-memory-gib", "12", "--agents", "5")
    assert "5 agents at 25,480 tokens need" in err and "fewer --agents" in err
    err = refused(capsys, str(glm41v_9b_config), "--gpu-memory-gib", "80",
                  "--context", "70000")
    assert "70,000 tokens is longer than" in err and "65,536" in err


def table_output(checkpoint: Path) -> list[str]:
    out = io.StringIO()
    assert main([str(checkpoint), "--table"], out) == 0
    return out.getvalue().splitlines()


def test_table_is_the_grid_of_card_sizes(glm41v_9b_config: Path) -> None:
    lines = table_output(glm41v_9b_config)
    assert lines[0].startswith("| card | cards | decoder | vision |")
    assert len(lines) == 2 + 2 * len(TABLE_CARDS_GIB)
    assert all(line.count("|") == 9 for line in lines)
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [(r[0], r[1]) for r in rows] == [
        (f"{size} GiB", str(gpus)) for size in TABLE_CARDS_GIB for gpus in (1, 2)]
    assert rows[0][2] == "does not fit"
    assert rows[-1][2:4] == ["bf16", "bf16"]


def test_the_docs_show_what_it_prints_for_glm41v_9b(glm41v_9b_config: Path) -> None:
    readme = (REPO / "README.md").read_text()
    assert "\n".join(table_output(glm41v_9b_config)) in readme
    out = io.StringIO()
    assert main([str(glm41v_9b_config), "--gpus", "2", "--gpu-memory-gib", "24"], out) == 0
    # the model's name is its directory's
    shown = out.getvalue().replace(glm41v_9b_config.name, "glm-4.1v-9b-thinking", 1)
    assert shown in (REPO / "docs" / "operations.md").read_text()


def test_tiny_phone_glm4v_reads_its_headers_and_processor(tmp_path: Path) -> None:
    directory = write_tiny_phone_glm4v_checkpoint(tmp_path / "phone")
    plan = run_plan(str(directory), "--gpus", "0", "--gpu-memory-gib", "4", "--context", "1000")
    assert plan["weights_source"] == "safetensors headers"
    assert plan["serving_dtype"] == "fp32"  # the service's auto on the CPU
    assert [c["device"] for c in plan["cards"]] == ["cpu"]
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # 2 layers, 2 KV heads x 32
    assert plan["image_tokens_per_screenshot"] == 3_108
    assert plan["agents_at_context"] == plan["kv_capacity_tokens"] // 1000


def test_tiny_glm4v_uses_its_own_small_image_geometry(tmp_path: Path) -> None:
    directory = write_tiny_glm4v_checkpoint(tmp_path / "tiny")
    plan = run_plan(str(directory), "--gpu-memory-gib", "2", "--context", "100")
    # its processor allows 64x64 px over two temporal frames, 4-px patches, 2x2 merge:
    # so a screenshot is at most half of an 8x8-token frame
    assert 0 < plan["image_tokens_per_screenshot"] <= (64 // 8) ** 2 // 2


def test_tiny_bundle_over_two_cards_puts_the_encoders_where_there_is_room(
        tiny_bundle: Path) -> None:
    plan = run_plan(str(tiny_bundle), "--gpus", "2", "--gpu-memory-gib", "2")
    weights = plan["weights_bytes"]
    assert set(weights) == {"decoder", "vision", "audio"}
    assert sum(sum(c["weights"].values()) for c in plan["cards"]) == sum(weights.values())
    holder = next(c for c in plan["cards"] if "vision" in c["weights"])
    assert holder["weights"]["audio"] == weights["audio"]
    assert plan["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 2  # bf16: 2 layers, 2 x 16
    assert plan["context"] == 2048  # the tiny decoder's own context, under 25,480
    assert plan["image_tokens_per_screenshot"] == 4  # 64 px / 16 px = 4x4 patches, 2x2 merge


def test_text_output_and_bad_arguments(tiny_bundle: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert main([str(tiny_bundle), "--gpu-memory-gib", "2"], out) == 0
    assert "KV per token:" in out.getvalue() and "phone agents at" in out.getvalue()
    assert "autoglm-plan: error:" in refused(capsys, str(tmp_path), "--gpu-memory-gib", "2")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tiny_bundle)], io.StringIO())
    assert exit_info.value.code == 2
    assert "--gpu-memory-gib" in capsys.readouterr().err


def test_the_environment_splits_glm41v_over_the_planned_cards(glm41v_9b_config: Path) -> None:
    out = io.StringIO()
    assert main([str(glm41v_9b_config), "--gpus", "2", "--gpu-memory-gib", "24", "--env"],
                out) == 0
    assert "AUTOGLM_DEVICE=cuda:0,cuda:1" in out.getvalue().splitlines()
