"""Flex decode against the gather path on one model: both paths' logits for 8 prompts
decoded 4 steps, rows crossing block boundaries (tests/unit/test_flex_decode.py).

Run as a module on the CPU (`python -m tests.unit.flex_equality modular|glm4v PATH`) so
that the compiled CPU kernel runs in a process of its own: exit 0 when the paths agree,
1 (and what differs) when not.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from inference_svc.model.paged.flex_decode import FlexPagedStep
from inference_svc.model.paged.kv_pool import RowSlots

BLOCK = 16
PROMPT_LENGTHS = [5, 15, 16, 17, 31, 33, 40, 47]  # every row's next position: in, at and
STEPS = 4  # past a block boundary, the rows of one step spanning one to three blocks


def decode(model, prompts: list[list[int]], steps: int) -> list[torch.Tensor]:
    """Each step's logits [rows, vocab]: the prompts prefilled, then greedy decode steps."""
    pool = model.new_kv_pool(block_size=BLOCK, blocks=64)
    if not pool.zeroed:
        # what never-written host memory may hold, every time: a path that reads an
        # unwritten slot (or a pool that should be zeroed and is not) shows as NaN
        for layer in (*pool.keys, *pool.values):
            layer[:, BLOCK:] = float("nan")
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


def compare(model, tolerance: float, *, argmax: bool) -> None:
    """Gather, then flex, on the same prompts: AssertionError where they differ, or where
    flex did not attend in every layer of every step. The gather path's pool starts with
    NaN in every slot it has not written; flex's is zeroed (KVPool `zeroed`)."""
    torch.manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (n,)).tolist()
               for n in PROMPT_LENGTHS]
    gathered = decode(model, prompts, STEPS)
    attended = []
    attend = FlexPagedStep.attend
    FlexPagedStep.attend = lambda self, *args: attended.append(args[0]) or attend(self, *args)
    try:
        model.read_kv_by("flex")
        flexed = decode(model, prompts, STEPS)
    finally:
        FlexPagedStep.attend = attend
        model.read_kv_by("gather")
    assert len(attended) == STEPS * model.config.num_hidden_layers, len(attended)
    for step, (a, b) in enumerate(zip(gathered, flexed, strict=True)):
        torch.testing.assert_close(b.float(), a.float(), atol=tolerance, rtol=tolerance,
                                   msg=f"decode step {step}")
        if argmax:
            assert torch.equal(a.argmax(-1), b.argmax(-1)), f"decode step {step} argmax"


def main() -> int:
    kind, path = sys.argv[1], Path(sys.argv[2])
    if kind == "glm4v":
        from inference_svc.model.glm4v import Glm4vModel

        model = Glm4vModel(path)
    else:
        from inference_svc.model.modular import ModularModel

        model = ModularModel(path)
    try:
        compare(model, 1e-4, argmax=True)
    except AssertionError as error:
        print(f"flex differs from gather: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
