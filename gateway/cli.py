"""`autoglm-gateway`: serve the OpenAI-compatible HTTP API in front of the gRPC service.

Its settings are `GatewayConfig`'s (flags, AUTOGLM_GATEWAY_* environment); bad values
exit 2 before the app is built.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

import structlog
import uvicorn

from autoglm_common.logging_setup import configure_logging
from autoglm_settings import deprecated_names

from .config import ENV_PREFIX, GatewayConfig, config_from_args

log = structlog.get_logger(__name__)


def warn_deprecated_env(environ: Mapping[str, str]) -> None:
    """One warning per deprecated variable set; `ignored` when its new name is set too."""
    for old, new in deprecated_names(GatewayConfig, ENV_PREFIX).items():
        if old in environ:
            log.warning("deprecated_environment_variable", name=old, use=new,
                        ignored=new in environ)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        config = config_from_args(None if argv is None else list(argv))
    except ValueError as exc:
        print(f"autoglm-gateway: error: {exc}", file=sys.stderr)
        sys.exit(2)
    configure_logging(fmt=config.log_format, level=config.log_level)
    warn_deprecated_env(os.environ)
    from .app import create_app

    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        # Our structlog JSON lines are the log; uvicorn's text logs and access lines are off.
        log_config=None,
        access_log=False,
        log_level=config.log_level,
        timeout_graceful_shutdown=10,
    )
