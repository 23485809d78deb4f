"""The gateway's settings: flags, the AUTOGLM_GATEWAY_* environment, the names it had
before (still read, with a warning), and bad values refused before the app starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from gateway.cli import main, warn_deprecated_env
from gateway.config import GatewayConfig, config_from_args
from tests.conftest import REPO


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, Path]:
    """Three existing files: the config checks that TLS paths are readable, not their PEM."""
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("-----BEGIN CERTIFICATE-----\n")
    return files


def test_environment_sets_defaults_and_flags_override_them() -> None:
    environ = {
        "AUTOGLM_GATEWAY_PORT": "9001",
        "AUTOGLM_GATEWAY_GRPC_TARGET": "10.0.0.5:50051",
        "AUTOGLM_GATEWAY_SERVED_MODEL_NAME": "phone",
        "AUTOGLM_GATEWAY_LOG_LEVEL": "DEBUG",
    }

    from_env = config_from_args([], environ)
    from_flags = config_from_args(["--port", "9002", "--grpc-target", "h:1"], environ)

    assert (from_env.port, from_env.upstream_target, from_env.served_model_name) == (
        9001, "10.0.0.5:50051", "phone")
    assert (from_env.host, from_env.log_level) == ("127.0.0.1", "debug")
    assert (from_flags.port, from_flags.upstream_target) == (9002, "h:1")


def test_every_flag_and_variable_the_gateway_had_keeps_its_meaning(pem_files) -> None:
    expected = GatewayConfig(
        host="0.0.0.0", port=9000, upstream_target="svc:50051",
        upstream_tls_ca=pem_files["ca"], upstream_tls_cert=pem_files["cert"],
        upstream_tls_key=pem_files["key"], served_model_name="phone",
        max_body_bytes=1024, request_timeout_s=30.0, log_level="warning")
    values = {"host": "0.0.0.0", "port": "9000", "grpc-target": "svc:50051",
              "grpc-tls-ca": str(pem_files["ca"]), "grpc-tls-cert": str(pem_files["cert"]),
              "grpc-tls-key": str(pem_files["key"]), "served-model-name": "phone",
              "max-body-bytes": "1024", "request-timeout-s": "30", "log-level": "WARNING"}
    flags = [part for name, value in values.items() for part in (f"--{name}", value)]
    gateway_env = {"AUTOGLM_GATEWAY_" + name.upper().replace("-", "_"): value
                   for name, value in values.items()}
    old_env = {"AUTOGLM_GATEWAY_HOST": "0.0.0.0", "AUTOGLM_GATEWAY_PORT": "9000",
               "AUTOGLM_GRPC_TARGET": "svc:50051", "AUTOGLM_GRPC_TLS_CA": str(pem_files["ca"]),
               "AUTOGLM_GRPC_TLS_CERT": str(pem_files["cert"]),
               "AUTOGLM_GRPC_TLS_KEY": str(pem_files["key"]),
               "AUTOGLM_SERVED_MODEL_NAME": "phone", "AUTOGLM_GATEWAY_MAX_BODY_BYTES": "1024",
               "AUTOGLM_GATEWAY_REQUEST_TIMEOUT_S": "30", "AUTOGLM_GATEWAY_LOG_LEVEL": "WARNING"}

    assert config_from_args(flags, {}) == expected
    assert config_from_args([], gateway_env) == expected
    assert config_from_args([], old_env) == expected


def test_the_api_key_comes_from_the_environment_only(capsys) -> None:
    assert config_from_args([], {"AUTOGLM_GATEWAY_API_KEY": "secret"}).api_key == "secret"
    assert config_from_args([], {"AUTOGLM_API_KEY": "secret"}).api_key == "secret"
    assert config_from_args([], {"AUTOGLM_GATEWAY_API_KEY": ""}).api_key is None
    with pytest.raises(SystemExit):
        config_from_args(["--api-key", "secret"], {})
    assert "unrecognized arguments: --api-key" in capsys.readouterr().err


def test_deprecated_names_are_each_warned_about() -> None:
    environ = {"AUTOGLM_GRPC_TARGET": "10.0.0.5:50051", "AUTOGLM_API_KEY": "secret"}

    with structlog.testing.capture_logs() as logs:
        warn_deprecated_env(environ)

    assert [(e["log_level"], e["name"], e["use"], e["ignored"]) for e in logs] == [
        ("warning", "AUTOGLM_GRPC_TARGET", "AUTOGLM_GATEWAY_GRPC_TARGET", False),
        ("warning", "AUTOGLM_API_KEY", "AUTOGLM_GATEWAY_API_KEY", False),
    ]


def test_the_new_name_wins_over_the_deprecated_one() -> None:
    environ = {"AUTOGLM_GATEWAY_GRPC_TARGET": "new:1", "AUTOGLM_GRPC_TARGET": "old:1"}

    with structlog.testing.capture_logs() as logs:
        warn_deprecated_env(environ)

    assert config_from_args([], environ).upstream_target == "new:1"
    assert [(e["name"], e["ignored"]) for e in logs] == [("AUTOGLM_GRPC_TARGET", True)]


def test_without_environment_the_defaults_apply() -> None:
    config = config_from_args([], {})

    assert config == GatewayConfig()
    assert (config.host, config.port, config.upstream_target) == (
        "127.0.0.1", 8000, "127.0.0.1:50051")
    assert (config.upstream_tls, config.api_key, config.request_timeout_s) == (
        False, None, None)


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--max-body-bytes", "0"], {}, "--max-body-bytes must be positive, got 0"),
        ([], {"AUTOGLM_GATEWAY_PORT": "eighty"}, "port must be an integer, got 'eighty'"),
        ([], {"AUTOGLM_GATEWAY_LOG_LEVEL": "loud"}, "--log-level 'loud' is not one of"),
        (["--grpc-tls-cert", "/nonexistent/cert.pem", "--grpc-tls-key", "/nonexistent/k"], {},
         "--grpc-tls-cert /nonexistent/cert.pem is not a readable file"),
        (["--request-timeout-s", "-1"], {}, "--request-timeout-s must be positive"),
    ],
)
def test_bad_values_exit_2_with_the_setting_named(argv, environ, message, monkeypatch,
                                                   capsys) -> None:
    for name in [name for name in os.environ if name.startswith("AUTOGLM_")]:
        monkeypatch.delenv(name)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(SystemExit) as exit_info:
        main(argv)

    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_refuses_a_bad_value_before_serving() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "--grpc-tls-key", "key.pem"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={name: value for name, value in os.environ.items()
             if not name.startswith("AUTOGLM_")},
    )

    assert result.returncode == 2
    assert result.stderr == (
        "autoglm-gateway: error: --grpc-tls-cert and --grpc-tls-key go together\n")
