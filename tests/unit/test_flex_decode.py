"""Decode attention over the paged pool in place (`--paged-attention flex`) against the
gather path it may replace: the same logits, step after step, for rows that cross block
boundaries and differ in length."""

from __future__ import annotations

import pytest
import torch

from inference_svc.model.checkpoints.placement import plan_placement
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.modular import ModularModel
from inference_svc.model.paged.flex_decode import FlexPagedStep
from inference_svc.model.paged.kv_pool import RowSlots
from tests.fixtures.tiny_models import write_tiny_glm4v_checkpoint

BLOCK = 16
PROMPT_LENGTHS = [5, 15, 16, 17, 31, 33, 40, 47]  # every row's next position: in, at and
STEPS = 4  # past a block boundary, the rows of one step spanning one to three blocks


def _decode(model, prompts: list[list[int]], steps: int,
            ) -> list[torch.Tensor]:
    """Each step's logits [rows, vocab]: the prompts prefilled, then greedy decode steps."""
    pool = model.new_kv_pool(block_size=BLOCK, blocks=64)
    tables, next_block = [], 1
    for prompt in prompts:
        need = -(-(len(prompt) + steps) // BLOCK)
        tables.append(list(range(next_block, next_block + need)))
        next_block += need
    slots = [torch.tensor([b * BLOCK + i for b in t for i in range(BLOCK)]) for t in tables]
    logits = model.forward_paged(
        pool, [RowSlots(s[:len(p)], s[:len(p)]) for s, p in zip(slots, prompts, strict=True)],
        [torch.tensor(p) for p in prompts])  # (forward_paged moves them to the device)
    lengths = [len(p) for p in prompts]
    out = []
    for _ in range(steps):
        tokens = [int(t) for t in logits.argmax(-1)]
        logits = model.decode_paged(pool, tables, lengths, tokens)
        out.append(logits)
        lengths = [n + 1 for n in lengths]
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_flex_decode_gives_the_gather_paths_logits(tiny_bundle, monkeypatch, device):
    """fp32 on the CPU: equal to float rounding, the same greedy tokens; bfloat16 on a GPU
    (the compiled Triton kernel): equal within bfloat16's tolerance."""
    if device == "cpu":
        model, tolerance = ModularModel(tiny_bundle), 1e-4
    else:
        model = ModularModel(tiny_bundle, dtype=torch.bfloat16,
                             placement=plan_placement(device))
        tolerance = 2e-2
    attended = []
    attend = FlexPagedStep.attend
    monkeypatch.setattr(FlexPagedStep, "attend",
                        lambda self, *args: attended.append(args[0]) or attend(self, *args))
    torch.manual_seed(0)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)).tolist() for n in PROMPT_LENGTHS]
    gathered = _decode(model, prompts, STEPS)
    model.read_kv_by("flex")
    flexed = _decode(model, prompts, STEPS)
    assert len(attended) == STEPS * model.config.num_hidden_layers  # every layer, every step
    _assert_same(gathered, flexed, tolerance, argmax=device == "cpu")


def test_glm4v_decodes_through_flex_as_through_gather(tmp_path):
    """GLM-4.1V's decoder (its multimodal rope, its own layers) on the CPU."""
    model = Glm4vModel(write_tiny_glm4v_checkpoint(tmp_path / "glm4v"))
    torch.manual_seed(1)
    prompts = [torch.randint(3, model.config.vocab_size, (n,)).tolist()
               for n in PROMPT_LENGTHS]
    gathered = _decode(model, prompts, STEPS)
    model.read_kv_by("flex")
    _assert_same(gathered, _decode(model, prompts, STEPS), 1e-4, argmax=True)


def _assert_same(gathered: list[torch.Tensor], flexed: list[torch.Tensor], tolerance: float,
                 *, argmax: bool) -> None:
    for step, (a, b) in enumerate(zip(gathered, flexed, strict=True)):
        torch.testing.assert_close(b.float(), a.float(), atol=tolerance, rtol=tolerance,
                                   msg=f"decode step {step}")
        if argmax:
            assert torch.equal(a.argmax(-1), b.argmax(-1))
