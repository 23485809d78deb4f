"""The lean host passes (model/paged/lean_forward.py) against transformers' own forward
through the same paged step, for each architecture they serve (Llama, GLM, and GLM-4.1V
with its rope offsets and multimodal positions): bitwise the same logits and the same KV
written, for decode steps over rows of different lengths and for packs of prompt chunks
and decode rows, in fp32, bf16 and int8; and they are taken only where they apply."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import (
    Glm4vForConditionalGeneration,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from inference_svc.model.paged.forward import PagedForward
from inference_svc.model.paged.kv_pool import KVPool, PagedStep, RowSlots
from inference_svc.model.paged.lean_forward import (
    ARCHITECTURES,
    HostDecoders,
    lean_decode,
    lean_segments,
)
from inference_svc.model.paged.segment_step import SegmentStep, segment_attention
from inference_svc.model.precision import quantize_linears, resolve_precision
from tests.fixtures.tiny_models import tiny_glm4v_config

BLOCK = 4
SMALL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5}


def tiny_decoder(architecture: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if architecture == "llama":
        decoder = LlamaForCausalLM(LlamaConfig(**SMALL, attn_implementation="sdpa"))
    elif architecture == "glm":
        decoder = GlmForCausalLM(GlmConfig(**SMALL, pad_token_id=0, attn_implementation="sdpa"))
    else:
        config = tiny_glm4v_config(patch=4, max_positions=512, vision={
            "depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64,
            "image_size": 32})
        config.text_config.vocab_size = SMALL["vocab_size"]
        config._attn_implementation = "sdpa"
        decoder = Glm4vForConditionalGeneration._from_config(config, dtype=torch.float32)
    return decoder.eval()


def text_config(decoder: nn.Module):
    return getattr(decoder.config, "text_config", decoder.config)


def pool_for(decoder: nn.Module) -> KVPool:
    config = text_config(decoder)
    dtype = decoder.get_input_embeddings().weight.dtype
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    return KVPool(layer_devices=["cpu"] * config.num_hidden_layers,
                  kv_heads=config.num_key_value_heads, head_dim=head_dim,
                  dtype=dtype, block_size=BLOCK, blocks=40, zeroed=True)


def transformers_step(decoder: nn.Module, step: PagedStep, embeds: torch.Tensor
                      ) -> torch.Tensor:
    return PagedForward._run_decoder(decoder, step, embeds)


def our_step(decoder: nn.Module, step: PagedStep, embeds: torch.Tensor) -> torch.Tensor:
    return lean_decode(decoder, ARCHITECTURES[type(decoder)], step, embeds)


def decode_steps(decoder, run) -> tuple[list[torch.Tensor], KVPool]:
    """Three sequences in blocks that are not in order: the first decodes 6 tokens alone,
    then the second joins for 3, then all three decode 7 more together, crossing block
    boundaries at different steps; each row's rope position runs ahead of its length by
    its own offset (as a multimodal rope's does after images; a plain rope reads it as the
    position). Each row feeds back its argmax."""
    pool = pool_for(decoder)
    tables = [[5, 1, 9, 2, 14], [3, 11, 7, 20], [8, 4, 16, 12]]
    lengths, tokens, offsets = [0, 0, 0], [17, 101, 250], [0, 40, 7]
    logits_seen = []
    for count in [1] * 6 + [2] * 3 + [3] * 7:
        step = PagedStep.decode(pool, tables[:count], lengths[:count], pool.dtype,
                                offsets[:count])
        with torch.inference_mode():
            embeds = decoder.get_input_embeddings()(torch.tensor(tokens[:count]))[:, None]
            logits = run(decoder, step, embeds)
        logits_seen.append(logits)
        for row in range(count):
            lengths[row] += 1
            tokens[row] = int(logits[row].argmax())
    return logits_seen, pool


def in_weights(decoder: nn.Module, weights: str) -> nn.Module:
    if weights == "bf16":
        return decoder.to(torch.bfloat16)
    if weights in ("int8", "int4"):
        precision = resolve_precision("--decoder-weights", weights, torch.float32, ["cpu"])
        return quantize_linears(decoder, precision)
    return decoder


def assert_same(ours: list[torch.Tensor], our_pool: KVPool, theirs: list[torch.Tensor],
                their_pool: KVPool) -> None:
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert torch.equal(a, b), f"pass {index} differs by {(a - b).abs().max()}"
    for mine, reference in zip([*our_pool.keys, *our_pool.values],
                               [*their_pool.keys, *their_pool.values], strict=True):
        assert torch.equal(mine, reference)


WEIGHTS = pytest.mark.parametrize("weights", ["fp32", "bf16", "int8", "int4"])
ARCHITECTURE_NAMES = pytest.mark.parametrize("architecture", ["llama", "glm", "glm4v"])


@WEIGHTS
@ARCHITECTURE_NAMES
def test_the_lean_decode_step_gives_transformers_logits_and_kv(architecture, weights):
    decoder = in_weights(tiny_decoder(architecture), weights)
    assert_same(*decode_steps(decoder, our_step), *decode_steps(decoder, transformers_step))


def transformers_segments(decoder: nn.Module, step: SegmentStep, embeds: torch.Tensor
                          ) -> torch.Tensor:
    """What PagedForward.forward_paged asks of transformers for a pack of segments."""
    layers = list(ARCHITECTURES[type(decoder)].text_model(decoder).layers)
    with segment_attention(layers):
        return decoder(inputs_embeds=embeds, position_ids=step.positions, cache=step,
                       paged_step=step, use_cache=False,
                       logits_to_keep=torch.tensor(step.last)).logits[0]


def our_segments(decoder: nn.Module, step: SegmentStep, embeds: torch.Tensor) -> torch.Tensor:
    return lean_segments(decoder, ARCHITECTURES[type(decoder)], step, embeds)


def slots(table: list[int], start: int, stop: int) -> torch.Tensor:
    return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(start, stop)])


def segment_passes(decoder: nn.Module, run) -> tuple[list[torch.Tensor], KVPool]:
    """Two prompts prefill together; then one pack holds the first's decode row, the
    second's next chunk and a third prompt whole, whose positions (for a multimodal rope)
    differ per axis, as an image's do."""
    pool = pool_for(decoder)
    tables = [[5, 1, 9, 2], [3, 11, 7, 20], [8, 4, 16, 12]]
    ids = torch.randint(3, 290, (3, 12), generator=torch.Generator().manual_seed(1))
    table = decoder.get_input_embeddings()
    image_like = torch.stack([torch.arange(5), torch.tensor([0, 0, 1, 1, 2]),
                              torch.tensor([0, 1, 0, 1, 0])]) + 3
    passes = [
        ([RowSlots(slots(tables[0], 0, 7), slots(tables[0], 0, 7)),
          RowSlots(slots(tables[1], 0, 6), slots(tables[1], 0, 6))],
         [ids[0, :7], ids[1, :6]], None),
        ([RowSlots(slots(tables[0], 7, 8), slots(tables[0], 0, 8)),
          RowSlots(slots(tables[1], 6, 11), slots(tables[1], 0, 11)),
          RowSlots(slots(tables[2], 0, 5), slots(tables[2], 0, 5))],
         [ids[0, 7:8], ids[1, 6:11], ids[2, :5]],
         [None, None, image_like] if ARCHITECTURES[type(decoder)].rope_axes > 1 else None),
    ]
    logits = []
    for segments, inputs, positions in passes:
        step = SegmentStep(pool, segments, positions)
        with torch.inference_mode():
            embeds = torch.cat([table(x) for x in inputs])[None]
            logits.append(run(decoder, step, embeds))
    return logits, pool


@WEIGHTS
@ARCHITECTURE_NAMES
def test_a_lean_pack_of_chunks_and_rows_gives_transformers_logits_and_kv(architecture,
                                                                         weights):
    decoder = in_weights(tiny_decoder(architecture), weights)
    assert_same(*segment_passes(decoder, our_segments),
                *segment_passes(decoder, transformers_segments))


def test_the_lean_step_serves_known_architectures_on_the_host_without_hooks():
    chooser = HostDecoders()
    decoder = tiny_decoder("llama")
    assert chooser.architecture_for(decoder) is not None

    hooked = copy.deepcopy(decoder)
    hooked.model.layers[1].mlp.register_forward_hook(lambda *_: None)
    assert chooser.architecture_for(hooked) is None  # a hook would be skipped: not taken

    assert chooser.architecture_for(decoder) is not None  # decided again for another decoder
    hook = decoder.model.norm.register_forward_pre_hook(lambda *_: None)
    assert chooser.architecture_for(decoder) is None  # a hook added later is seen at the next step
    hook.remove()
    assert chooser.architecture_for(decoder) is not None

    wrapped = copy.deepcopy(decoder)  # as accelerate's placement wraps a module's forward
    norm = wrapped.model.layers[0].input_layernorm
    norm.forward = lambda x, _forward=norm.forward: _forward(x.to("cpu"))
    assert chooser.architecture_for(wrapped) is None


def test_an_unknown_architecture_keeps_transformers_forward():
    class Subclassed(LlamaForCausalLM):  # may change anything about the forward
        pass

    torch.manual_seed(0)
    assert HostDecoders().architecture_for(Subclassed(LlamaConfig(**SMALL)).eval()) is None
