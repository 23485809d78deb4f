"""One forward for prompt chunks and decode rows (model/paged/segment_step.py) against the
separate passes it replaces: the same logits and the same KV written, for the embedded
default's decoder and for GLM-4.1V, whose decode rows continue a rope offset after images."""

from __future__ import annotations

import pytest
import torch

from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.paged.kv_pool import RowSlots
from inference_svc.types import ChatMessage, ImagePart, TextPart
from tests.conftest import png_bytes
from tests.fixtures.tiny_models import write_tiny_glm4v_checkpoint

SIZE = 16


def slots(first_block: int, start: int, stop: int) -> torch.Tensor:
    """Positions [start, stop) of a sequence whose blocks are first_block, first_block+1..."""
    return torch.tensor([(first_block + p // SIZE) * SIZE + p % SIZE for p in range(start, stop)])


def prompt(model, text: str, *, image: bool = False):
    parts = [TextPart(text)]
    if image:
        parts.insert(0, ImagePart(png_bytes((40, 40), (10, 200, 30)), "image/png", "f"))
    messages = [ChatMessage("user", parts)]
    media = model.decode_media(messages, max_pixels=1 << 20)
    plan = model.plan(messages, media, enable_thinking=False)
    return plan, model.prompt_inputs(plan, media)


def prefilled(model, pool, inputs, first_block: int) -> torch.Tensor:
    n = inputs.embeds.shape[0]
    positions = None if inputs.positions is None else [inputs.positions]
    return model.forward_paged(pool, [RowSlots(slots(first_block, 0, n),
                                               slots(first_block, 0, n))],
                               [inputs.embeds], positions)[0]


@pytest.fixture(scope="module")
def glm4v(tmp_path_factory) -> Glm4vModel:
    return Glm4vModel(write_tiny_glm4v_checkpoint(tmp_path_factory.mktemp("seg") / "glm4v"))


@pytest.mark.parametrize("which", ["default", "glm4v"])
def test_chunks_and_decode_rows_in_one_forward_match_separate_passes(model, glm4v, which):
    """Two sequences decode their next token while one prompt prefills its second chunk
    and another its whole self: one packed forward against a prefill pass and a decode
    step, on pools that start equal."""
    model = glm4v if which == "glm4v" else model
    image = which == "glm4v"
    decoding = [prompt(model, "the first decoding sequence", image=image),
                prompt(model, "a second one, a little longer than the first")]
    chunked = prompt(model, "a prompt in two chunks " * 3, image=image)
    whole = prompt(model, "short one")
    pools = [model.new_kv_pool(block_size=SIZE, blocks=64) for _ in range(2)]
    firsts = [1, 9, 17, 25]
    next_tokens: list[int] = []
    for index, pool in enumerate(pools):  # both: the decoding prompts cached, a chunk in
        for (_, inputs), first in zip(decoding, firsts, strict=False):
            logits = prefilled(model, pool, inputs, first)
            if index == 0:
                next_tokens.append(int(logits.argmax()))
        cut = chunked[1].embeds.shape[0] // 2
        head_positions = None if chunked[1].positions is None else [
            chunked[1].positions[:, :cut]]
        model.forward_paged(pool, [RowSlots(slots(17, 0, cut), slots(17, 0, cut))],
                            [chunked[1].embeds[:cut]], head_positions)
    lengths = [inputs.embeds.shape[0] for _, inputs in decoding]
    offsets = [inputs.position_offset for _, inputs in decoding]
    n_chunked, n_whole = chunked[1].embeds.shape[0], whole[1].embeds.shape[0]

    # separate: the prompts' pass, then the decode step
    prompt_segments = [RowSlots(slots(17, cut, n_chunked), slots(17, 0, n_chunked)),
                       RowSlots(slots(25, 0, n_whole), slots(25, 0, n_whole))]
    prompt_inputs = [chunked[1].embeds[cut:], whole[1].embeds]
    prompt_positions = None
    if chunked[1].positions is not None:
        prompt_positions = [chunked[1].positions[:, cut:], whole[1].positions]
    apart = model.forward_paged(pools[0], prompt_segments, prompt_inputs, prompt_positions)
    tables = [list(range(first, first + 8)) for first in firsts[:2]]
    decoded = model.decode_paged(pools[0], tables, lengths, next_tokens, offsets)

    # together
    decode_segments = [RowSlots(slots(first, n, n + 1), slots(first, 0, n + 1))
                       for first, n in zip(firsts, lengths, strict=False)]
    positions = [*(prompt_positions or [None, None]),
                 *[torch.tensor([[n + offset]]) for n, offset in zip(lengths, offsets,
                                                                      strict=True)]]
    together = model.forward_paged(
        pools[1], prompt_segments + decode_segments,
        prompt_inputs + [torch.tensor([t]) for t in next_tokens], positions)

    torch.testing.assert_close(together[:2], apart, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together[2:], decoded, rtol=1e-4, atol=1e-4)
    written = torch.cat([s.write for s in prompt_segments + decode_segments])
    torch.testing.assert_close(pools[1].keys[0][:, written], pools[0].keys[0][:, written],
                               rtol=1e-4, atol=1e-4)
