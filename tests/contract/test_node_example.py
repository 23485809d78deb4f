"""clients/examples/node/ (chat.mjs, and live.mjs for GenerateLive), the Node.js client
that loads the .proto files at run time, streaming replies from a real server.

Its npm dependencies are installed with `npm ci` (the committed lock file) into a copy of
the example laid out as in the repository, so the work tree is left as it was. Skipped
where node or npm is absent (`.ci/run` installs them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from autoglm_client import InferenceClient, Sampling, wav_chunks

from tests.clients.test_live_client import stereo_wav
from tests.conftest import REPO, ServerProcess, png_bytes, wav_bytes

NODE, NPM = shutil.which("node"), shutil.which("npm")
EXAMPLE = REPO / "clients" / "examples" / "node"
FILES = ("chat.mjs", "live.mjs", "inference.mjs", "package.json", "package-lock.json")

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="node/npm not installed")


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example's scripts with their node_modules, beside a link to protos/ as in the
    repository."""
    root = tmp_path_factory.mktemp("node-example")
    (root / "protos").symlink_to(REPO / "protos")
    example = root / "clients" / "examples" / "node"
    example.mkdir(parents=True)
    for name in FILES:
        shutil.copy2(EXAMPLE / name, example / name)
    result = subprocess.run(
        [str(NPM), "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=example,
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(f"npm ci failed:\n{result.stdout}\n{result.stderr}")
    return example


@pytest.fixture(scope="module")
def chat_script(example: Path) -> Path:
    return example / "chat.mjs"


@pytest.fixture(scope="module")
def live_script(example: Path) -> Path:
    return example / "live.mjs"


def run_node(script: Path, *args: str, target: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOGLM_TARGET": target}
    return subprocess.run([str(NODE), str(script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_node_example_streams_a_reply(chat_script: Path, inference_server: ServerProcess,
                                      tmp_path: Path) -> None:
    image = tmp_path / "shot.png"
    image.write_bytes(png_bytes())
    result = run_node(chat_script, "What is on screen?", "--image", str(image),
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
    result = run_node(chat_script, "hi", "--image", str(image), target=inference_server.target)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT" in result.stderr


def test_node_live_example_speaks_a_wav_and_streams_the_reply(
        live_script: Path, inference_server: ServerProcess, tmp_path: Path) -> None:
    clip = tmp_path / "question.wav"
    clip.write_bytes(wav_bytes(0.3))
    result = run_node(live_script, str(clip), "--prompt", "Listen.", "--max-new-tokens", "6",
                      "--temperature", "0", target=inference_server.target)
    with InferenceClient(inference_server.target, timeout=120) as client:
        python_reply = client.generate_live(
            "Listen.", wav_chunks(clip), Sampling(max_new_tokens=6, temperature=0.0))
    assert result.returncode == 0, result.stderr
    assert python_reply.text and result.stdout == python_reply.text + "\n"
    usage, live = result.stderr.splitlines()
    assert usage.startswith("usage: ") and "request node-" in usage
    assert re.fullmatch(r"live: 0\.30 s of audio; first token \d+\.\d{3} s after its end", live)


def test_node_live_example_without_a_prompt_or_pacing(
        live_script: Path, inference_server: ServerProcess, tmp_path: Path) -> None:
    clip = tmp_path / "question.wav"
    clip.write_bytes(wav_bytes(0.3))
    result = run_node(live_script, str(clip), "--no-pace", "--max-new-tokens", "4",
                      target=inference_server.target)
    assert result.returncode == 0, result.stderr
    assert "live: 0.30 s of audio; " in result.stderr


def test_node_live_example_refuses_a_stereo_wav_with_exit_2(
        live_script: Path, tmp_path: Path) -> None:
    clip = tmp_path / "stereo.wav"
    clip.write_bytes(stereo_wav())
    result = run_node(live_script, str(clip), target="127.0.0.1:1")
    assert result.returncode == 2
    assert "live audio is 16 kHz mono 16-bit; this WAV is 16000 Hz, 2 channel(s)" in result.stderr


def test_node_live_example_reports_a_refused_chunk_and_exits_1(
        live_script: Path, inference_server: ServerProcess, tmp_path: Path) -> None:
    clip = tmp_path / "long.wav"
    clip.write_bytes(wav_bytes(0.7))
    result = run_node(live_script, str(clip), "--chunk-ms", "600", "--no-pace",
                      target=inference_server.target)
    assert result.returncode == 1
    assert "error: INVALID_ARGUMENT" in result.stderr and "longer than 500 ms" in result.stderr
