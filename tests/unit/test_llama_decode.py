"""The lean host decode step of a Llama decoder (model/paged/llama_decode.py) against
transformers' own forward through the same paged step: bitwise the same logits and the
same KV written, step after step, for rows of different lengths, in fp32 and in int8; and the
step is taken only where it applies."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from inference_svc.model.paged.forward import PagedForward
from inference_svc.model.paged.kv_pool import KVPool, PagedStep
from inference_svc.model.paged.llama_decode import HostDecoders, llama_decode
from inference_svc.model.precision import quantize_linears, resolve_precision

BLOCK = 4


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def pool_for(decoder: LlamaForCausalLM) -> KVPool:
    config = decoder.config
    return KVPool(layer_devices=["cpu"] * config.num_hidden_layers,
                  kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                  dtype=torch.float32, block_size=BLOCK, blocks=40, zeroed=True)


def transformers_step(decoder: LlamaForCausalLM, step: PagedStep, embeds: torch.Tensor
                      ) -> torch.Tensor:
    return PagedForward._run_decoder(decoder, step, embeds)


def decode_steps(decoder, run) -> tuple[list[torch.Tensor], KVPool]:
    """Three sequences in blocks that are not in order: the first decodes 6 tokens alone,
    then the second joins for 3, then all three decode 7 more together, crossing block
    boundaries at different steps. Each row feeds back its argmax."""
    pool = pool_for(decoder)
    tables = [[5, 1, 9, 2, 14], [3, 11, 7, 20], [8, 4, 16, 12]]
    lengths, tokens = [0, 0, 0], [17, 101, 250]
    logits_seen = []
    for count in [1] * 6 + [2] * 3 + [3] * 7:
        step = PagedStep.decode(pool, tables[:count], lengths[:count], torch.float32)
        with torch.inference_mode():
            embeds = decoder.get_input_embeddings()(torch.tensor(tokens[:count]))[:, None]
            logits = run(decoder, step, embeds)
        logits_seen.append(logits)
        for row in range(count):
            lengths[row] += 1
            tokens[row] = int(logits[row].argmax())
    return logits_seen, pool


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_the_lean_step_gives_transformers_logits_and_kv(weights):
    decoder = tiny_llama()
    if weights == "int8":
        precision = resolve_precision("--decoder-weights", "int8", torch.float32, ["cpu"])
        decoder = quantize_linears(decoder, precision)
    theirs, their_pool = decode_steps(decoder, transformers_step)
    ours, our_pool = decode_steps(decoder, llama_decode)
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"step {step} differs by {(a - b).abs().max()}"
    for mine, reference in zip([*our_pool.keys, *our_pool.values],
                               [*their_pool.keys, *their_pool.values], strict=True):
        assert torch.equal(mine, reference)


def test_the_lean_step_serves_a_host_llama_only():
    chooser = HostDecoders()
    decoder = tiny_llama()
    assert chooser.step_for(decoder) is not None

    hooked = copy.deepcopy(decoder)
    hooked.model.layers[1].mlp.register_forward_hook(lambda *_: None)
    assert chooser.step_for(hooked) is None  # a hook would be skipped: not taken

    assert chooser.step_for(decoder) is not None  # decided again for another decoder
