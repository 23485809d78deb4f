"""Issue 10's GPU throughput table under pytest: CUDA only (the `gpu` mark skips it
elsewhere). The benchmark itself, its settings and its CPU smoke mode are in
tests/bench/gpu_throughput.py; the device script is .gpu/bench.sh."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.gpu_throughput import Plan, run

pytestmark = [pytest.mark.bench, pytest.mark.gpu, pytest.mark.timeout(1200)]


async def test_gpu_throughput(tmp_path: Path) -> None:
    plan = Plan.from_env()
    payload = await run(plan, tmp_path)
    assert "error" not in payload, payload["error"]
    assert payload["rows"], "no concurrency level was measured"
    assert payload["bandwidth"]["bound_tokens_per_s"] > 0
