"""deploy/systemd: the units verify, and agree with each other and with the programs.

`systemd-analyze verify` checks syntax, known keys and that ExecStart is executable (the
units point at /opt/autoglm-serve/.venv; the test points them at this venv). The rest
reads the unit files: dependencies, the shared socket path, stop timeouts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import config_from_args
from memory_daemon.config import load_config
from tests.conftest import REPO

UNITS = REPO / "deploy" / "systemd"
INSTALLED_BIN = "/opt/autoglm-serve/.venv/bin"
NAMES = ("autoglm-server", "autoglm-memd", "autoglm-gateway")
ENGINE_STOP_S, FLUSH_S = 10, 2  # what the service may add to its grace period when stopping


def read_unit(name: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (UNITS / f"{name}.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def environment(unit: dict) -> dict[str, str]:
    return dict(value.split("=", 1) for value in unit["Service"].get("Environment", []))


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_units_verify(tmp_path):
    for name in NAMES:
        text = (UNITS / f"{name}.service").read_text()
        (tmp_path / f"{name}.service").write_text(
            text.replace(INSTALLED_BIN, str(Path(sys.executable).parent)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(f"{n}.service" for n in NAMES)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr  # unknown keys and bad values only warn


def test_every_unit_runs_as_the_dedicated_user_with_the_environment_file():
    for name in NAMES:
        service = read_unit(name)["Service"]
        assert service["User"] == ["autoglm"] and service["Group"] == ["autoglm"]
        assert service["EnvironmentFile"] == ["-/etc/autoglm/autoglm.env"]
        assert service["Restart"] == ["on-failure"]  # the watchdog's exit 70 is a failure
        assert service["NoNewPrivileges"] == ["yes"]
        assert service["ExecStart"][0].startswith(f"{INSTALLED_BIN}/{name}")


def test_server_keeps_cuda_reachable():
    service = read_unit("autoglm-server")["Service"]
    for breaks_cuda in ("PrivateDevices", "MemoryDenyWriteExecute", "ProcSubset", "DevicePolicy"):
        assert breaks_cuda not in service
    assert environment(read_unit("autoglm-server"))["PYTORCH_CUDA_ALLOC_CONF"] == (
        "expandable_segments:True")


def test_stop_timeout_outlasts_the_drain():
    server = read_unit("autoglm-server")
    grace = float(environment(server)["AUTOGLM_GRACE_PERIOD"])
    assert seconds(server["Service"]["TimeoutStopSec"][0]) > grace + FLUSH_S + ENGINE_STOP_S


def test_the_daemon_and_gateway_follow_the_service():
    memd, gateway = read_unit("autoglm-memd"), read_unit("autoglm-gateway")
    assert memd["Unit"]["BindsTo"] == ["autoglm-server.service"]
    assert memd["Unit"]["After"] == ["autoglm-server.service"]
    assert memd["Install"]["WantedBy"] == ["autoglm-server.service"]  # restarted with it
    assert gateway["Unit"]["Requires"] == ["autoglm-server.service"]
    assert gateway["Unit"]["After"] == ["autoglm-server.service"]


def test_the_control_socket_lives_in_the_servers_runtime_directory():
    server, memd = read_unit("autoglm-server"), read_unit("autoglm-memd")
    assert server["Service"]["RuntimeDirectory"] == ["autoglm"]
    # only the service owns it: another unit stopping must not remove the socket
    assert "RuntimeDirectory" not in memd["Service"]
    server_env = environment(server)
    socket = server_env["AUTOGLM_CONTROL_SOCKET"]
    assert socket.startswith("/run/autoglm/")
    # the daemon's own configuration loader reads the unit's environment
    config = load_config(environ=environment(memd))
    assert config.control.target == f"unix://{socket}"
    assert config.host.pid_file == server_env["AUTOGLM_PORT_FILE"]
    assert config.daemon.probe == "nvml"


def test_gateway_targets_the_services_default_port():
    gateway_env = environment(read_unit("autoglm-gateway"))
    assert gateway_env["AUTOGLM_GATEWAY_GRPC_TARGET"] == "127.0.0.1:50051"
    config = config_from_args([], gateway_env)  # the gateway's own reading of the unit
    assert (config.upstream_target, config.host, config.port) == (
        "127.0.0.1:50051", "127.0.0.1", 8000)


def test_the_environment_file_example_holds_keys_the_programs_accept():
    settings = [line.lstrip("#") for line in (UNITS / "autoglm.env").read_text().splitlines()
                if re.fullmatch(r"#?AUTOGLM_[A-Z_]+=\S*", line)]
    assert any(line.startswith("AUTOGLM_MODEL_DIR=") for line in settings)
    memd = dict(line.split("=", 1) for line in settings if line.startswith("AUTOGLM_MEMD_"))
    assert memd
    load_config(environ=memd)  # unknown daemon keys would raise
    gateway = dict(line.split("=", 1) for line in settings if line.startswith("AUTOGLM_GATEWAY_"))
    config = config_from_args([], gateway)
    assert config.api_key == "change-me"
    assert config.host == gateway["AUTOGLM_GATEWAY_HOST"]
