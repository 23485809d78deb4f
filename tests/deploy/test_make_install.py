"""`make install` chooses torch by TORCH_SPEC and TORCH_INDEX; nothing is installed.

A throwaway venv whose `pip` only records its arguments is installed for real with the
default (CPU) choice; `make -n` then shows what a changed choice would run.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

CUDA_INDEX = "https://download.pytorch.org/whl/cu128"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def make(venv: Path, *args: str, dry: bool = True) -> list[list[str]]:
    flags = ["-n"] if dry else []
    result = subprocess.run(["make", *flags, "install", f"VENV={venv}", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=True)
    return [shlex.split(line) for line in result.stdout.splitlines()
            if line.strip() and not line.startswith("make")]


def pip_installs_of_torch(commands: list[list[str]]) -> list[list[str]]:
    return [argv for argv in commands
            if argv[0].endswith("/pip") and argv[1] == "install"
            and any(arg.startswith("torch") for arg in argv[2:])]


def recorded_pip_calls(venv: Path) -> list[list[str]]:
    calls = (venv / "pip.calls").read_text().split("\0\n")
    return [call.split("\0") for call in calls if call]


@pytest.fixture
def installed_venv(tmp_path) -> Path:
    """A venv installed with the default torch choice by a pip that only records argv."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    pip = venv / "bin" / "pip"
    calls = venv / "pip.calls"
    pip.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" >> {calls}\necho >> {calls}\n")
    pip.chmod(0o755)
    make(venv, dry=False)
    assert ["install", "-q", "torch==2.13.0"] in recorded_pip_calls(venv)
    assert make(venv) == []  # up to date: nothing to run
    return venv


def test_fresh_install_gets_the_cpu_default_without_an_index(tmp_path):
    [torch] = pip_installs_of_torch(make(tmp_path / "venv"))
    assert "torch==2.13.0" in torch
    assert "--index-url" not in torch


def test_torch_index_reaches_pip_as_separate_arguments(installed_venv):
    commands = make(installed_venv, f"TORCH_INDEX={CUDA_INDEX}")
    [torch] = pip_installs_of_torch(commands)
    assert "torch==2.13.0" in torch
    position = torch.index("--index-url")
    assert torch[position + 1] == CUDA_INDEX
    # the old torch goes first, so pip cannot keep the CPU build as "already satisfied"
    assert commands[0][1:] == ["uninstall", "-q", "-y", "torch"]
    # only torch changes: the project itself is not reinstalled
    assert not any("-e" in argv for argv in commands)


def test_a_spec_with_operators_and_several_packages_stays_quoted(installed_venv):
    [torch] = pip_installs_of_torch(
        make(installed_venv, "TORCH_SPEC=torch>=2.4 torchvision", f"TORCH_INDEX={CUDA_INDEX}"))
    assert torch[-4:] == ["torch>=2.4", "torchvision", "--index-url", CUDA_INDEX]


def test_going_back_to_the_default_reinstalls_torch(installed_venv):
    make(installed_venv, f"TORCH_INDEX={CUDA_INDEX}", dry=False)
    last = recorded_pip_calls(installed_venv)[-1]
    assert last == ["install", "-q", "torch==2.13.0", "--index-url", CUDA_INDEX]
    assert make(installed_venv, f"TORCH_INDEX={CUDA_INDEX}") == []
    [torch] = pip_installs_of_torch(make(installed_venv))
    assert "--index-url" not in torch
