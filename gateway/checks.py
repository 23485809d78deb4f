"""Checks every route makes: the API key and the model name, for HTTP and WebSocket alike."""

from __future__ import annotations

import hmac

from autoglm_common.bounds import quote

from .config import GatewayConfig
from .errors import AuthenticationFailed, NotFound


def check_api_key(config: GatewayConfig, authorization: str | None) -> None:
    """Raise AuthenticationFailed unless auth is off or `authorization` is 'Bearer <key>'."""
    if config.api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), config.api_key.encode()
    ):
        raise AuthenticationFailed(
            "Incorrect or missing API key; send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
        )


def check_model(model: str, config: GatewayConfig, *, param: str | None) -> None:
    if model != config.served_model_name:
        raise NotFound(
            f"The model {quote(model)} does not exist; "
            f"this gateway serves '{config.served_model_name}'",
            param=param,
            code="model_not_found",
        )
