"""Decode attention over the paged pool in place (`--paged-attention flex`) against the
gather path it may replace: the same logits, step after step, for 8 rows that cross
block boundaries and differ in length (tests/unit/flex_equality.py).

On the CPU each comparison runs in a process of its own: the compiled CPU flex kernel
once aborted a whole test run (SIGABRT inside PyTorch's generated code, not reproduced
alone), which is why the service offers flex for GPU pools only; here such an abort
skips the comparison (and says so) instead of ending the run; a difference fails it.
On a GPU the kernel is Triton's and runs in-process.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from inference_svc.model.checkpoints.placement import plan_placement
from inference_svc.model.modular import ModularModel
from tests.conftest import REPO
from tests.fixtures.tiny_models import write_tiny_glm4v_checkpoint
from tests.unit.flex_equality import compare


def compare_in_own_process(kind: str, path) -> None:
    done = subprocess.run([sys.executable, "-m", "tests.unit.flex_equality", kind, str(path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    if done.returncode == -signal.SIGABRT:  # PyTorch's kernel, not a difference in logits
        pytest.skip(f"the compiled CPU flex kernel aborted: {done.stderr[-500:]}")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-3000:]}"


@pytest.mark.timeout(660)
def test_flex_decode_gives_the_gather_paths_logits_on_the_cpu(tiny_bundle):
    compare_in_own_process("modular", tiny_bundle)


@pytest.mark.timeout(660)
def test_glm4v_decodes_through_flex_as_through_gather(tmp_path):
    """GLM-4.1V's decoder (its multimodal rope, its own layers)."""
    compare_in_own_process("glm4v", write_tiny_glm4v_checkpoint(tmp_path / "glm4v"))


@pytest.mark.gpu
def test_flex_decode_gives_the_gather_paths_logits_on_a_gpu(tiny_bundle):
    """bfloat16, the compiled Triton kernel: equal within bfloat16's tolerance."""
    model = ModularModel(tiny_bundle, dtype=torch.bfloat16, placement=plan_placement("cuda:0"))
    compare(model, 2e-2, argmax=False)
