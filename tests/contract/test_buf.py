"""buf: the protos pass `buf lint` (STANDARD rules) and build as one module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUF = shutil.which("buf")
pytestmark = pytest.mark.skipif(BUF is None, reason="buf is not installed (npm @bufbuild/buf)")


@pytest.mark.parametrize("command", [["lint"], ["build"]])
def test_buf_accepts_the_protos(command: list[str]) -> None:
    result = subprocess.run([BUF, *command], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip(), result.stdout
