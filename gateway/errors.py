"""Errors in OpenAI's JSON shape, and the mapping from upstream gRPC statuses.

Every error the gateway answers with is a `GatewayError`; one exception handler in
`app` renders it as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status and, for 429/503, a ``Retry-After`` header. What a failed call's status and
trailers say (reason, field, retry hint) is read by `autoglm_client.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from autoglm_client.errors import error_from_rpc_error

from autoglm_common.bounds import clip

_PARAM_BYTES = 256  # params are paths into the body, whose keys the client chose


class GatewayError(Exception):
    """An error the HTTP client is told about."""

    status_code = 500
    error_type = "server_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        message = clip(message)  # messages quote client input and upstream errors
        super().__init__(message)
        self.message = message
        self.param = clip(param, _PARAM_BYTES) if param else param
        self.code = code
        self.retry_after_s = retry_after_s

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(self.retry_after_s)}


class BadRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"


class NotFound(GatewayError):
    status_code = 404
    error_type = "invalid_request_error"


class MethodNotAllowed(GatewayError):
    status_code = 405
    error_type = "invalid_request_error"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"


class ClientClosedRequest(GatewayError):
    """The client went away; the status (nginx's 499) is only ever seen in logs."""

    status_code = 499
    error_type = "invalid_request_error"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"


class NotImplementedByUpstream(GatewayError):
    status_code = 501


class UpstreamUnavailable(GatewayError):
    status_code = 503


class UpstreamTimeout(GatewayError):
    status_code = 504


# Upstream status -> the error class whose HTTP status the client gets (others: 500).
_ERROR_CLASS_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequest,
    grpc.StatusCode.OUT_OF_RANGE: BadRequest,
    grpc.StatusCode.FAILED_PRECONDITION: BadRequest,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationFailed,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNIMPLEMENTED: NotImplementedByUpstream,
    grpc.StatusCode.DEADLINE_EXCEEDED: UpstreamTimeout,
    grpc.StatusCode.UNAVAILABLE: UpstreamUnavailable,
    grpc.StatusCode.CANCELLED: UpstreamUnavailable,
}
# Errors that name the request field they are about, and those worth retrying later.
_WITH_PARAM = (BadRequest, NotFound)
_RETRYABLE = (RateLimited, UpstreamUnavailable)


def error_from_rpc(error: grpc.aio.AioRpcError, *, default_retry_after_s: int) -> GatewayError:
    """Translate a failed upstream call into the HTTP error the client should see."""
    upstream = error_from_rpc_error(error)
    message = upstream.message or upstream.code.name.lower()
    error_class = _ERROR_CLASS_BY_CODE.get(upstream.code, GatewayError)
    # gRPC's own message-size limit also reports RESOURCE_EXHAUSTED; that one is not
    # load, retrying cannot help, so it is a 413.
    if error_class is RateLimited and "larger than max" in message:
        return PayloadTooLarge(message, code="message_too_large")
    hint = upstream.retry_after_s
    return error_class(
        message,
        param=upstream.field if issubclass(error_class, _WITH_PARAM) else None,
        code=(upstream.reason or upstream.code.name).lower(),
        retry_after_s=(None if not issubclass(error_class, _RETRYABLE)
                       else default_retry_after_s if hint is None else math.ceil(hint)),
    )


def bad_request_from_validation(errors: Sequence[Mapping[str, Any]], *,
                                skip: str | None = None) -> BadRequest:
    """The first of pydantic's validation errors, its location (less the `skip` part)
    as the param: ``messages[0].content``."""
    first = errors[0]
    location = [part for part in first.get("loc", ()) if part != skip]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location)
    param = param.lstrip(".") or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return BadRequest(message, param=param, code="invalid_value")
