"""`autoglm-gateway`: serve the OpenAI-compatible HTTP API in front of the gRPC service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import structlog
import uvicorn

from .config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODEL_NAME, GatewayConfig


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="autoglm-gateway",
        description="OpenAI-compatible HTTP gateway for the autoglm-serve gRPC service.",
    )
    parser.add_argument("--host", default=environ.get("AUTOGLM_GATEWAY_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=int(environ.get("AUTOGLM_GATEWAY_PORT", "8000"))
    )
    parser.add_argument(
        "--grpc-target",
        default=environ.get("AUTOGLM_GRPC_TARGET", "127.0.0.1:50051"),
        help="host:port of the inference service's public gRPC API",
    )
    parser.add_argument(
        "--served-model-name",
        default=environ.get("AUTOGLM_SERVED_MODEL_NAME", DEFAULT_MODEL_NAME),
        help="the model name clients must send",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=int(environ.get("AUTOGLM_GATEWAY_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
    )
    parser.add_argument(
        "--request-timeout-s",
        type=float,
        default=_optional_float(environ.get("AUTOGLM_GATEWAY_REQUEST_TIMEOUT_S")),
        help="gRPC deadline per generation (default: none)",
    )
    parser.add_argument("--log-level", default=environ.get("AUTOGLM_LOG_LEVEL", "info").lower())
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv, os.environ)
    _configure_logging(args.log_level)
    # The key is read from the environment only, so it never shows in `ps`.
    config = GatewayConfig(
        upstream_target=args.grpc_target,
        served_model_name=args.served_model_name,
        api_key=os.environ.get("AUTOGLM_API_KEY") or None,
        max_body_bytes=args.max_body_bytes,
        request_timeout_s=args.request_timeout_s,
    )
    from .app import create_app

    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


def _optional_float(value: str | None) -> float | None:
    return float(value) if value else None


def _configure_logging(level: str) -> None:
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer(ensure_ascii=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
