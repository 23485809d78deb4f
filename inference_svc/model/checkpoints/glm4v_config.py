"""A GLM-4.1V checkpoint's config.json, in either layout it ships in, read as GLM-4.1V.

Two layouts exist. transformers 5 nests the text model's keys under `text_config` with the
rope in `rope_parameters` (AutoGLM-Phone-9B ships this). GLM-4.1V-9B-Thinking's first
release (transformers 4.53) kept the text keys at the top level, with `rope_scaling`
(`mrope_section`) and `partial_rotary_factor` beside them. transformers 5 reads that
layout without a word and gets it wrong: it ignores the top-level text keys (a default
9B text model) and drops the partial rotary and the mrope split, so the model would run
with the wrong rope. Here the flat layout is moved into the nested one first, and a file
that cannot be read as GLM-4.1V is refused at start-up, never built with defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import GenerationConfig, Glm4vConfig

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
MODEL_TYPE = "glm4v"
# Glm4vTextConfig's own keys: in the flat layout they sit at the top level.
TEXT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "max_position_embeddings",
    "initializer_range", "rms_norm_eps", "use_cache", "attention_dropout", "pad_token_id",
    "eos_token_id", "attention_bias",
)
# Without these the text model's shape would be transformers' defaults, not the file's.
REQUIRED_TEXT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


class UnreadableCheckpoint(ValueError):
    """A checkpoint directory that cannot be served as the model it claims to be."""


@dataclass(frozen=True)
class Glm4vCheckpointConfig:
    """What config.json (and generation_config.json, where present) say."""

    config: Glm4vConfig
    layout: str  # "nested" (transformers 5) or "flat" (transformers 4.53)
    eos_token_ids: list[int]
    generation_file: str  # where the generation defaults came from: its own file or config.json


def read_glm4v_config(directory: Path) -> Glm4vCheckpointConfig:
    path = directory / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UnreadableCheckpoint(f"{path}: cannot be read ({exc})") from exc
    if raw.get("model_type") != MODEL_TYPE:
        raise UnreadableCheckpoint(
            f"{path}: model_type is {raw.get('model_type')!r}, not {MODEL_TYPE!r}")
    layout = "nested" if "text_config" in raw else "flat"
    nested = raw if layout == "nested" else _nest(raw)
    text = nested.get("text_config") or {}
    missing = [key for key in REQUIRED_TEXT_KEYS if key not in text]
    if missing:
        raise UnreadableCheckpoint(
            f"{path}: no {', '.join(missing)} for the text model (neither under text_config "
            f"nor at the top level)")
    if not nested.get("vision_config"):
        raise UnreadableCheckpoint(f"{path}: no vision_config")
    _check_rope(path, text)
    config = Glm4vConfig.from_dict(nested)
    # generation_config.json where the checkpoint has one; else config.json's defaults
    own = (directory / GENERATION_CONFIG).is_file()
    generation = (GenerationConfig.from_pretrained(directory, local_files_only=True) if own
                  else GenerationConfig.from_model_config(config))
    return Glm4vCheckpointConfig(config, layout, _eos_ids(generation, nested),
                                 GENERATION_CONFIG if own else CONFIG)


def _nest(raw: dict) -> dict:
    """The flat layout as the nested one: text keys and the rope under text_config."""
    nested = {key: value for key, value in raw.items()
              if key not in TEXT_KEYS and key not in ("rope_scaling", "rope_theta",
                                                      "partial_rotary_factor")}
    text = {key: raw[key] for key in TEXT_KEYS if key in raw}
    scaling = raw.get("rope_scaling") or {}
    rope = {"rope_type": scaling.get("rope_type", scaling.get("type", "default"))}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in raw:
            rope[key] = raw[key]
    if "mrope_section" in scaling:
        rope["mrope_section"] = scaling["mrope_section"]
    text["rope_parameters"] = rope
    nested["text_config"] = text
    return nested


def _check_rope(path: Path, text: dict) -> None:
    """GLM-4.1V's rope splits the rotary half of each head over (time, height, width):
    the split must be there and cover exactly the rotary frequencies."""
    rope = text.get("rope_parameters") or {}
    section = rope.get("mrope_section")
    if not section:
        raise UnreadableCheckpoint(f"{path}: the text model's rope has no mrope_section "
                                   f"(GLM-4.1V's rope has three axes)")
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    rotary = int(head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    if 2 * sum(section) != rotary:
        raise UnreadableCheckpoint(
            f"{path}: mrope_section {section} covers {2 * sum(section)} rotary dimensions, "
            f"but the head's rotary part has {rotary} (head_dim {head_dim}, "
            f"partial_rotary_factor {rope.get('partial_rotary_factor', 1.0)})")


def _eos_ids(generation: GenerationConfig, nested: dict) -> list[int]:
    """Every id the checkpoint stops at: generation_config's, else config.json's (top level,
    then the text model's). GLM-4.1V has four, `</answer>` among them."""
    for eos in (generation.eos_token_id, nested.get("eos_token_id"),
                (nested.get("text_config") or {}).get("eos_token_id")):
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            return sorted({int(i) for i in ids})
    return []
