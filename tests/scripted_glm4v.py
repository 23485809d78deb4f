"""A tiny GLM-4.1V checkpoint rigged to answer in GLM-4.1V's format, for format tests.

Random weights say nothing in particular; these say one thing. Each script piece is one
added token, every decoder layer's output projections are zero (so the residual stream at
a position is its token's embedding), and the LM head scores, for each token, the piece
after it highest. Greedy decoding therefore replies, whatever the prompt and image:

    <think>THOUGHT</think><answer>ACTION</answer><|endoftext|>

A checkpoint whose eos ids include `</answer>` (GLM-4.1V's own) stops there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, Glm4vForConditionalGeneration

from inference_svc.model.checkpoints.glm4v_config import read_glm4v_config
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

THOUGHT = "The home screen is showing; the Settings app is the next step."
ACTION = 'do(action="Launch", app="Settings")'
REPLY = f"<think>{THOUGHT}</think><answer>{ACTION}</answer>"
LOGIT_SCALE = 3.0


def write_scripted_glm4v_checkpoint(
        out: Path, *, base: Callable[[Path], Path] = write_tiny_phone_glm4v_checkpoint) -> Path:
    """`base`'s checkpoint, rigged. Where its vocabulary has room for the two script
    pieces its config.json stays as written (layout, eos ids) and no generation config
    is added."""
    base(out)
    config_file = (out / "config.json").read_text()
    had_generation_config = (out / "generation_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens([AddedToken(piece, special=False, normalized=False)
                          for piece in (THOUGHT, ACTION)])
    model = Glm4vForConditionalGeneration.from_pretrained(
        out, config=read_glm4v_config(out).config).eval()
    resized = len(tokenizer) > model.config.text_config.vocab_size
    if resized:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    # Every prompt the chat template renders ends in "\n" after <|assistant|>.
    prompt_end = tokenizer.encode("<|assistant|>\n", add_special_tokens=False)[-1]
    chain = [prompt_end, *tokenizer.convert_tokens_to_ids(
        ["<think>", THOUGHT, "</think>", "<answer>", ACTION, "</answer>", "<|endoftext|>"])]
    with torch.no_grad():
        text = model.model.language_model
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.norm.weight.fill_(1.0)
        embeddings = text.embed_tokens.weight
        embeddings.copy_(torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(0)))
        head = model.lm_head.weight
        head.zero_()
        for current, following in itertools.pairwise(chain):
            head[following] = LOGIT_SCALE * embeddings[current] / embeddings[current].norm()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not resized:
        (out / "config.json").write_text(config_file)
    if not had_generation_config:
        (out / "generation_config.json").unlink()
    return out
