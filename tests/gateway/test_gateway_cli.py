"""The gateway's flags and its AUTOGLM_GATEWAY_* environment, old names included."""

from __future__ import annotations

import structlog

from gateway.cli import DEPRECATED_ENV_NAMES, env_value, parse_args, warn_deprecated_env


def test_environment_sets_defaults_and_flags_override_them() -> None:
    environ = {
        "AUTOGLM_GATEWAY_PORT": "9001",
        "AUTOGLM_GATEWAY_GRPC_TARGET": "10.0.0.5:50051",
        "AUTOGLM_GATEWAY_SERVED_MODEL_NAME": "phone",
        "AUTOGLM_GATEWAY_LOG_LEVEL": "DEBUG",
    }

    from_env = parse_args([], environ)
    from_flags = parse_args(["--port", "9002"], environ)

    assert (from_env.port, from_env.grpc_target, from_env.served_model_name) == (
        9001,
        "10.0.0.5:50051",
        "phone",
    )
    assert (from_env.host, from_env.log_level) == ("127.0.0.1", "debug")
    assert from_flags.port == 9002


def test_deprecated_names_still_work_and_each_is_warned_about() -> None:
    environ = {"AUTOGLM_GRPC_TARGET": "10.0.0.5:50051", "AUTOGLM_API_KEY": "secret"}

    with structlog.testing.capture_logs() as logs:
        warn_deprecated_env(environ)

    assert parse_args([], environ).grpc_target == "10.0.0.5:50051"
    assert env_value(environ, "API_KEY", "") == "secret"
    assert [(e["log_level"], e["name"], e["use"], e["ignored"]) for e in logs] == [
        ("warning", "AUTOGLM_GRPC_TARGET", "AUTOGLM_GATEWAY_GRPC_TARGET", False),
        ("warning", "AUTOGLM_API_KEY", "AUTOGLM_GATEWAY_API_KEY", False),
    ]


def test_the_new_name_wins_over_the_deprecated_one() -> None:
    environ = {"AUTOGLM_GATEWAY_GRPC_TARGET": "new:1", "AUTOGLM_GRPC_TARGET": "old:1"}

    with structlog.testing.capture_logs() as logs:
        warn_deprecated_env(environ)

    assert parse_args([], environ).grpc_target == "new:1"
    assert [(e["name"], e["ignored"]) for e in logs] == [("AUTOGLM_GRPC_TARGET", True)]


def test_every_deprecated_name_maps_to_a_gateway_name() -> None:
    assert all(new.startswith("AUTOGLM_GATEWAY_") and not old.startswith("AUTOGLM_GATEWAY_")
               for old, new in DEPRECATED_ENV_NAMES.items())


def test_without_environment_the_defaults_apply() -> None:
    args = parse_args([], {})

    assert (args.host, args.port, args.grpc_target) == ("127.0.0.1", 8000, "127.0.0.1:50051")
    assert (args.grpc_tls_ca, args.request_timeout_s, args.log_level) == ("", None, "info")
