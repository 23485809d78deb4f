"""GLM-4.1V served from the real checkpoint's own files (tests/fixtures/real_glm4v.py).

The chat template, tokenizer config and processor configs are GLM-4.1V-9B-Thinking's as
published; the weights are tiny and random. What is checked is what a user pointing the
service at the real download gets: the config read in both layouts with the real rope,
the prompt token for token what vLLM renders for the phone agent, the real eos ids, and
the real image geometry. Skipped where the shared files are not on this machine.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.models.glm4v.modeling_glm4v import Glm4vTextRotaryEmbedding

from inference_svc.model.checkpoints.glm4v_config import UnreadableCheckpoint, read_glm4v_config
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.glm4v_vision import DEPLOYMENT_MAX_PIXELS, GLM4V_MAX_PIXELS
from inference_svc.types import ChatMessage, ImagePart, TextPart
from tests.fixtures.real_glm4v import (
    flat_config,
    require_real_files,
    with_layout,
    write_real_files_checkpoint,
)
from tests.inference_svc.test_glm4v import contiguous
from tests.phone_agent_messages import (
    agent_step_messages,
    as_chat_messages,
    first_difference,
    screenshot_png,
    vllm_prompt,
)

REAL_EOS = [151329, 151336, 151338, 151348]
REPLY = ("<think>The home screen is showing; Settings is the next step.</think>"
         '<answer>do(action="Launch", app="Settings")</answer>')


@pytest.fixture(scope="module")
def files() -> Path:
    return require_real_files()


@pytest.fixture(scope="module")
def flat(files, tmp_path_factory) -> Path:
    return write_real_files_checkpoint(tmp_path_factory.mktemp("real") / "flat", files=files)


@pytest.fixture(scope="module")
def nested(flat, tmp_path_factory) -> Path:
    return with_layout(flat, tmp_path_factory.mktemp("real") / "nested", "nested")


@pytest.fixture(scope="module")
def model(flat) -> Glm4vModel:
    return Glm4vModel(flat)


# ---- config.json in both layouts ------------------------------------------------------


def test_the_published_config_reads_as_glm41v_9b_with_its_rope(files):
    """The real file, flat layout and full size: the 9B's shape, half-head rotary split
    8/12/12, the four eos ids; transformers alone reads it as a default rope."""
    read = read_glm4v_config(files)
    text = read.config.text_config
    assert read.layout == "flat"
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.vocab_size, text.max_position_embeddings) == (
        4096, 40, 32, 2, 151552, 65536)
    assert text.rope_parameters["partial_rotary_factor"] == 0.5
    assert text.rope_parameters["mrope_section"] == [8, 12, 12]
    assert read.eos_token_ids == REAL_EOS
    rope = Glm4vTextRotaryEmbedding(text)
    cos, _ = rope(torch.zeros(1, 6, text.hidden_size), torch.arange(6).expand(3, 1, 6))
    assert cos.shape == (1, 6, 64)  # rotary dims: half of the 128-wide head
    naive = AutoConfig.from_pretrained(files).text_config.rope_parameters
    assert "mrope_section" not in naive  # why the reader exists


def test_both_layouts_load_with_the_real_rope_and_give_the_same_logits(flat, nested):
    """Same weights, config.json flat (GLM-4.1V-9B-Thinking) or nested (AutoGLM-Phone-9B):
    the same model, the same logits for a prompt with a screenshot (the rope's three
    axes at work)."""
    messages = [ChatMessage("user", [ImagePart(screenshot_png(30, (280, 560)), "image/png",
                                               "messages[0].parts[0].image"),
                                     TextPart("What is on the screen?")])]
    logits = {}
    for name, checkpoint in (("flat", flat), ("nested", nested)):
        model = Glm4vModel(checkpoint)
        rope = model.config.rope_parameters
        assert (rope["partial_rotary_factor"], rope["mrope_section"]) == (0.5, [8, 12, 12])
        assert model.config.hidden_size == 128 and model.config.vocab_size == 151552
        assert model.manifest.details["config_layout"] == name
        media = model.decode_media(messages, max_pixels=DEPLOYMENT_MAX_PIXELS)
        plan = model.plan(messages, media, enable_thinking=False)
        inputs = model.prompt_inputs(plan, media)
        pool = model.new_kv_pool(block_size=16, blocks=len(plan.input_ids) // 16 + 2)
        [logits[name]] = model.forward_paged(pool, [contiguous(0, len(plan.input_ids))],
                                             [inputs.embeds], [inputs.positions])
    torch.testing.assert_close(logits["flat"], logits["nested"])


@pytest.mark.parametrize("broken", ["no_text_keys", "no_mrope", "mrope_mismatch", "not_glm4v"])
def test_a_config_that_cannot_be_read_as_glm41v_is_refused(files, tmp_path, broken):
    config = flat_config(files)
    if broken == "no_text_keys":
        del config["hidden_size"], config["num_hidden_layers"]
    elif broken == "no_mrope":
        del config["rope_scaling"]
    elif broken == "mrope_mismatch":
        config["rope_scaling"]["mrope_section"] = [16, 24, 24]
    else:
        config["model_type"] = "glm4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnreadableCheckpoint, match=r"config\.json"):
        read_glm4v_config(tmp_path)


def test_the_server_refuses_to_start_on_such_a_config_naming_what_is_missing(flat, tmp_path):
    """Never a default-shaped (9B) model: the server exits at once with the reason."""
    broken = with_layout(flat, tmp_path / "broken", "flat")
    config = json.loads((broken / "config.json").read_text())
    del config["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(config))
    done = subprocess.run(
        [sys.executable, "-m", "inference_svc.cli", "--model-dir", str(broken), "--port", "0",
         "--control-socket", "", "--log-format", "json"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "num_hidden_layers" in done.stderr and "config.json" in done.stderr


def test_the_checkpoints_own_files_are_what_was_read(model):
    details = model.manifest.details
    assert model.eos_token_ids == REAL_EOS == details["eos_token_ids"]
    assert details["chat_template"] == "chat_template.jinja"
    assert details["generation_config"] == "config.json"  # none in the directory
    assert details["image_token_id"] == model.image_token_id == 151343
    assert details["image_placeholder"] == "<|begin_of_image|><|image|><|end_of_image|>"


# ---- rendering ------------------------------------------------------------------------


def rendered(model: Glm4vModel, messages: list[ChatMessage]) -> str:
    media = model.decode_media(messages, max_pixels=DEPLOYMENT_MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=True)
    return model.tokenizer.decode(plan.input_ids)


def test_system_and_assistant_turns_reach_the_model_as_plain_text(model):
    """The real template renders `{{ msg.content }}` for system and assistant turns: a
    list of parts would reach the model as Python list syntax, newlines escaped."""
    text = rendered(model, [
        ChatMessage("system", [TextPart("Line one\nLine two")]),
        ChatMessage("user", [TextPart("hi")]),
        ChatMessage("assistant", [TextPart("<think>a</think><answer>b</answer>")]),
        ChatMessage("user", [TextPart("next")]),
    ])
    assert "[{" not in text and "'type'" not in text
    assert "<|system|>\nLine one\nLine two<|user|>\nhi<|assistant|>\n<think>a</think>" in text
    assert text.endswith("<|user|>\nnext<|assistant|>\n")


@pytest.mark.parametrize("step", [0, 2])
def test_the_phone_agents_prompt_is_token_for_token_what_vllm_renders(model, step, capsys):
    """Open-AutoGLM's messages at its first step and its third (earlier screenshots
    stripped, two earlier replies), against the real template through transformers
    under vLLM's string content format, image tokens counted by the real processor."""
    messages = agent_step_messages(step, [REPLY] * step)
    ours_messages = as_chat_messages(messages)
    media = model.decode_media(ours_messages, max_pixels=DEPLOYMENT_MAX_PIXELS)
    plan = model.plan(ours_messages, media, enable_thinking=False)
    processor = AutoImageProcessor.from_pretrained(model.bundle)
    image = Image.open(io.BytesIO(screenshot_png(40 * step)))
    grid = processor(images=[image], return_tensors="pt",
                     size={"shortest_edge": processor.size["shortest_edge"],
                           "longest_edge": DEPLOYMENT_MAX_PIXELS})["image_grid_thw"][0]
    reference = vllm_prompt(AutoTokenizer.from_pretrained(model.bundle), messages,
                            [int(grid.prod()) // 4], model.image_token_id)
    with capsys.disabled():
        print(f"\nstep {step + 1}: {first_difference(plan.input_ids, reference)}")
    assert plan.input_ids == reference, first_difference(plan.input_ids, reference)
    assert plan.image_tokens == 3108


def test_the_openai_content_format_keeps_a_user_turns_parts_in_order(flat):
    model = Glm4vModel(flat, content_format="openai")
    text = rendered(model, [ChatMessage("user", [
        TextPart("look:"), ImagePart(screenshot_png(0, (56, 56)), "image/png", "f")])])
    assert text.startswith("[gMASK]<sop><|user|>\nlook:<|begin_of_image|>")
    assert text.endswith("<|end_of_image|><|assistant|>\n")


# ---- images ---------------------------------------------------------------------------


@pytest.mark.parametrize(("max_pixels", "tokens", "seen"), [
    (GLM4V_MAX_PIXELS, 3354, (1092, 2408)),  # preprocessor_config.json's own limit
    (DEPLOYMENT_MAX_PIXELS, 3108, (1036, 2352)),  # the agent's deployment; our default
])
def test_a_screenshot_costs_what_the_real_preprocessor_config_says(model, max_pixels,
                                                                   tokens, seen):
    messages = [ChatMessage("user", [ImagePart(screenshot_png(0), "image/png", "f")])]
    media = model.decode_media(messages, max_pixels=max_pixels)
    assert model.image_tokens(media.grids[0]) == tokens
    assert media.images[0].image.size == seen
    assert model.default_max_pixels == DEPLOYMENT_MAX_PIXELS
