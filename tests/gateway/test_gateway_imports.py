"""The gateway stands on the client library alone: no torch, nothing of the service."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

# Imports the package and its entry points, builds the app and runs its lifespan (the
# upstream channel opens and closes), then lists what of the service's world got loaded.
PROBE = """
import asyncio, sys
import gateway, gateway.cli
from gateway.app import create_app
from gateway.config import GatewayConfig

app = create_app(GatewayConfig(upstream_target="127.0.0.1:1"))

async def start_and_stop():
    async with app.router.lifespan_context(app):
        pass

asyncio.run(start_and_stop())
loaded = sorted(name for name in sys.modules
                if name.partition(".")[0] in ("torch", "inference_svc", "transformers"))
print("gateway" in sys.modules, loaded)  # the last line: lifespan logs come before
"""


def test_gateway_runs_without_torch_or_the_service_package() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "True []"
