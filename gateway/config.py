"""Gateway configuration: one validated dataclass, the source of the flags, the
AUTOGLM_GATEWAY_<FLAG> environment variables and the README's table (see autoglm_settings).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from autoglm_settings import add_arguments, check_choices, load, setting

ENV_PREFIX = "AUTOGLM_GATEWAY_"
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


DEFAULT_MODEL_NAME = "autoglm-phone-9b"


@dataclass(slots=True, frozen=True)
class GatewayConfig:
    """Everything the gateway needs to serve; validated on construction. The upstream
    settings keep the flag names they had (`--grpc-*`), and the environment names from
    before the AUTOGLM_GATEWAY_ prefix are still read."""

    host: str = setting("127.0.0.1", help="address the HTTP API listens on")
    port: int = setting(8000, help="HTTP port (0 picks a free one)")
    upstream_target: str = setting(
        "127.0.0.1:50051", name="grpc_target", deprecated_env=("AUTOGLM_GRPC_TARGET",),
        help="host:port of the inference service's public gRPC API")
    # Any of the TLS files turns TLS to the service on.
    upstream_tls_ca: Path | None = setting(
        None, name="grpc_tls_ca", deprecated_env=("AUTOGLM_GRPC_TLS_CA",),
        help="PEM CA of the service's certificate: reach it over TLS")
    upstream_tls_cert: Path | None = setting(
        None, name="grpc_tls_cert", deprecated_env=("AUTOGLM_GRPC_TLS_CERT",),
        help="client certificate for a service that wants mTLS")
    upstream_tls_key: Path | None = setting(
        None, name="grpc_tls_key", deprecated_env=("AUTOGLM_GRPC_TLS_KEY",),
        help="key of --grpc-tls-cert")
    served_model_name: str = setting(
        DEFAULT_MODEL_NAME, deprecated_env=("AUTOGLM_SERVED_MODEL_NAME",),
        help="the model name clients must send")
    # No flag: a key on the command line would show in `ps`.
    api_key: str | None = setting(
        None, env_only=True, deprecated_env=("AUTOGLM_API_KEY",), shown="none (no auth)",
        help="the Bearer token clients must send")
    max_body_bytes: int = setting(32 * 1024 * 1024, shown="33554432 (32 MiB)", help=(
        "largest request body, in bytes (larger: 413)"))
    request_timeout_s: float | None = setting(None, shown="none", help=(
        "gRPC deadline per generation, in seconds"))
    health_timeout_s: float = setting(2.0, help="seconds GET /health waits for the service's "
                                                "health check")
    default_retry_after_s: int = setting(1, help=(
        "Retry-After sent with 429/503 when the service gives no hint of its own"))
    realtime_chunk_ms: int = setting(100, help=(
        "milliseconds of speech per chunk /v1/realtime streams to the service's GenerateLive "
        "while the user speaks (within the service's --live-audio-min/max-chunk-ms)"))
    log_format: str = setting("auto", choices=LOG_FORMATS, help=(
        "JSON lines, or a console renderer (auto: console on a terminal)"))
    log_level: str = setting("info", help="least level logged: " + ", ".join(LOG_LEVELS))

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port {self.port} is not in 0..65535")
        if not self.upstream_target:
            raise ValueError("--grpc-target must not be empty")
        if not self.served_model_name:
            raise ValueError("--served-model-name must not be empty")
        if self.api_key == "":
            raise ValueError("api_key must be None (auth off) or a non-empty string")
        if self.max_body_bytes <= 0:
            raise ValueError(f"--max-body-bytes must be positive, got {self.max_body_bytes}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError("--request-timeout-s must be positive, got "
                             f"{self.request_timeout_s}")
        if self.health_timeout_s <= 0:
            raise ValueError(f"--health-timeout-s must be positive, got {self.health_timeout_s}")
        if self.default_retry_after_s < 0:
            raise ValueError("--default-retry-after-s must not be negative, got "
                             f"{self.default_retry_after_s}")
        if not 1 <= self.realtime_chunk_ms <= 10_000:
            raise ValueError(f"--realtime-chunk-ms must be in 1..10000, got "
                             f"{self.realtime_chunk_ms}")
        self._check_tls()
        check_choices(self)
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level {self.log_level!r} is not one of "
                             f"{', '.join(LOG_LEVELS)}")
        # frozen: the one normalisation, so uvicorn and structlog get the same spelling
        object.__setattr__(self, "log_level", self.log_level.lower())

    def _check_tls(self) -> None:
        if (self.upstream_tls_cert is None) != (self.upstream_tls_key is None):
            raise ValueError("--grpc-tls-cert and --grpc-tls-key go together")
        for flag, path in (("--grpc-tls-ca", self.upstream_tls_ca),
                           ("--grpc-tls-cert", self.upstream_tls_cert),
                           ("--grpc-tls-key", self.upstream_tls_key)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path} is not a readable file")

    @property
    def upstream_tls(self) -> bool:
        return self.upstream_tls_ca is not None or self.upstream_tls_cert is not None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoglm-gateway",
        description="OpenAI-compatible HTTP gateway for the autoglm-serve gRPC service. "
                    f"Every flag --x-y also reads {ENV_PREFIX}X_Y; a flag given wins over "
                    f"the environment. The API key is {ENV_PREFIX}API_KEY, from the "
                    "environment only.",
    )
    add_arguments(parser, GatewayConfig, ENV_PREFIX)
    return parser


def config_from_args(argv: list[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Defaults < AUTOGLM_GATEWAY_* environment (deprecated names below the current
    ones) < flags, validated (ValueError) before the app is built."""
    args = build_parser().parse_args(argv)
    return load(GatewayConfig, ENV_PREFIX, args, os.environ if environ is None else environ)
