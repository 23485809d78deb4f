"""`autoglm-gateway`: serve the OpenAI-compatible HTTP API in front of the gRPC service.

Every flag also reads AUTOGLM_GATEWAY_<FLAG> (`--grpc-target`: AUTOGLM_GATEWAY_GRPC_TARGET);
the API key is AUTOGLM_GATEWAY_API_KEY, from the environment only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import structlog
import uvicorn
from autoglm_client.logging_setup import configure_logging

from .config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODEL_NAME, GatewayConfig

ENV_PREFIX = "AUTOGLM_GATEWAY_"
# The names these settings had before they all took ENV_PREFIX; still read, with a warning.
DEPRECATED_ENV_NAMES = {
    "AUTOGLM_GRPC_TARGET": "AUTOGLM_GATEWAY_GRPC_TARGET",
    "AUTOGLM_GRPC_TLS_CA": "AUTOGLM_GATEWAY_GRPC_TLS_CA",
    "AUTOGLM_GRPC_TLS_CERT": "AUTOGLM_GATEWAY_GRPC_TLS_CERT",
    "AUTOGLM_GRPC_TLS_KEY": "AUTOGLM_GATEWAY_GRPC_TLS_KEY",
    "AUTOGLM_SERVED_MODEL_NAME": "AUTOGLM_GATEWAY_SERVED_MODEL_NAME",
    "AUTOGLM_API_KEY": "AUTOGLM_GATEWAY_API_KEY",
}
_OLD_NAME_OF = {new: old for old, new in DEPRECATED_ENV_NAMES.items()}

log = structlog.get_logger(__name__)


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="autoglm-gateway",
        description="OpenAI-compatible HTTP gateway for the autoglm-serve gRPC service.",
    )
    parser.add_argument("--host", default=env_value(environ, "HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(env_value(environ, "PORT", "8000")))
    parser.add_argument(
        "--grpc-target",
        default=env_value(environ, "GRPC_TARGET", "127.0.0.1:50051"),
        help="host:port of the inference service's public gRPC API",
    )
    parser.add_argument(
        "--grpc-tls-ca",
        default=env_value(environ, "GRPC_TLS_CA", ""),
        help="PEM CA of the service's certificate: reach it over TLS",
    )
    parser.add_argument(
        "--grpc-tls-cert",
        default=env_value(environ, "GRPC_TLS_CERT", ""),
        help="client certificate for a service that wants mTLS",
    )
    parser.add_argument(
        "--grpc-tls-key",
        default=env_value(environ, "GRPC_TLS_KEY", ""),
        help="key of --grpc-tls-cert",
    )
    parser.add_argument(
        "--served-model-name",
        default=env_value(environ, "SERVED_MODEL_NAME", DEFAULT_MODEL_NAME),
        help="the model name clients must send",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(env_value(environ, "MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))),
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=_optional_float(env_value(environ, "REQUEST_TIMEOUT_S", "")),
        help="gRPC deadline per generation (default: none)",
    )
    parser.add_argument("--log-level", default=env_value(environ, "LOG_LEVEL", "info").lower())
    return parser.parse_args(argv)


def env_value(environ: Mapping[str, str], name: str, default: str) -> str:
    """AUTOGLM_GATEWAY_<name>, else its deprecated old name, else `default`."""
    key = ENV_PREFIX + name
    if key in environ:
        return environ[key]
    return environ.get(_OLD_NAME_OF.get(key, key), default)


def warn_deprecated_env(environ: Mapping[str, str]) -> None:
    for old, new in DEPRECATED_ENV_NAMES.items():
        if old in environ:
            log.warning("deprecated_environment_variable", name=old, use=new,
                        ignored=new in environ)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv, os.environ)
    configure_logging(level=args.log_level)
    warn_deprecated_env(os.environ)
    # The key is read from the environment only, so it never shows in `ps`.
    config = GatewayConfig(
        upstream_target=args.grpc_target,
        upstream_tls_ca=_optional_path(args.grpc_tls_ca),
        upstream_tls_cert=_optional_path(args.grpc_tls_cert),
        upstream_tls_key=_optional_path(args.grpc_tls_key),
        served_model_name=args.served_model_name,
        api_key=env_value(os.environ, "API_KEY", "") or None,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
    )
    from .app import create_app

    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        # Our structlog JSON lines are the log; uvicorn's text logs and access lines are off.
        log_config=None,
        access_log=False,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _optional_float(value: str | None) -> float | None:
    return float(value) if value else None
