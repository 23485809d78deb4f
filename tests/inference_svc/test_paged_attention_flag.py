"""--paged-attention through a real server: flex reads a pool on GPUs only, so on this
CPU it is a start-up error that names the flag (exit 2), before anything serves."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_flex_on_a_host_pool_is_a_start_up_error_naming_the_flag(tiny_bundle):
    done = subprocess.run(
        [sys.executable, "-m", "inference_svc.cli", "--model-dir", str(tiny_bundle),
         "--port", "0", "--control-socket", "", "--paged-attention", "flex"],
        capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "autoglm-server: error: --paged-attention flex: the KV pool is on cpu" in done.stderr
