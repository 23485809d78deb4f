"""clients/examples/node/chat.mjs, the Node.js client that loads the .proto files at run
time, streaming a reply from a real server.

Its npm dependencies are installed with `npm ci` (the committed lock file) into a copy of
the example laid out as in the repository, so the work tree is left as it was. Skipped
where node or npm is absent (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess, png_bytes

NODE, NPM = shutil.which("node"), shutil.which("npm")
EXAMPLE = REPO / "clients" / "examples" / "node"

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node/npm not installed")


@pytest.fixture(scope="module")
def chat_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chat.mjs with its node_modules, beside a link to protos/ as in the repository."""
    root = tmp_path_factory.mktemp("node-example")
    (root / "protos").symlink_to(REPO / "protos")
    example = root / "clients" / "examples" / "node"
    example.mkdir(parents=True)
    for name in ("chat.mjs", "package.json", "package-lock.json"):
        shutil.copy2(EXAMPLE / name, example / name)
    result = subprocess.run(
        [str(NPM), "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=example,
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed:\n{result.stdout}\n{result.stderr}")
    return example / "chat.mjs"


def run_chat(script: Path, *args: str, target: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOGLM_TARGET": target}
    return subprocess.run([str(NODE), str(script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_node_example_streams_a_reply(chat_script: Path, inference_server: ServerProcess,
                                      tmp_path: Path) -> None:
    image = tmp_path / "shot.png"
    image.write_bytes(png_bytes())
    result = run_chat(chat_script, "What is on screen?", "--image", str(image),
                      "--max-new-tokens", "6", target=inference_server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text streamed"
    usage = next(line for line in result.stderr.splitlines() if line.startswith("usage:"))
    assert "completion tokens" in usage and "finish: FINISH_REASON_" in usage
    assert "request node-" in usage  # the x-request-id the example sent came back


def test_node_example_reports_a_rejected_image_and_exits_1(
        chat_script: Path, inference_server: ServerProcess, tmp_path: Path) -> None:
    image = tmp_path / "broken.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    result = run_chat(chat_script, "hi", "--image", str(image), target=inference_server.target)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT" in result.stderr
