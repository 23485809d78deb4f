"""Errors in OpenAI's JSON shape, and the mapping from upstream gRPC statuses.

Every error the gateway answers with is a `GatewayError`; one exception handler in
`app` renders it as ``{"error": {"message", "type", "param", "code"}}`` with its HTTP
status and, for 429/503, a ``Retry-After`` header.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from inference_svc.bounds import clip

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
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


def error_from_rpc(error: grpc.aio.AioRpcError, *, default_retry_after_s: int) -> GatewayError:
    """Translate a failed upstream call into the HTTP error the client should see."""
    code = error.code()
    message = error.details() or code.name.lower()
    details = _RichDetails.from_trailers(error.trailing_metadata())
    error_code = details.reason or code.name.lower()
    retry_after_s = _retry_after_s(error.trailing_metadata(), details)
    if retry_after_s is None:
        retry_after_s = default_retry_after_s

    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return BadRequest(message, param=details.field, code=error_code)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRPC's own message-size limit also reports RESOURCE_EXHAUSTED; that one is not
        # load, retrying cannot help, so it is a 413.
        if "larger than max" in message:
            return PayloadTooLarge(message, code="message_too_large")
        return RateLimited(message, code=error_code, retry_after_s=retry_after_s)
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(message, param=details.field, code=error_code)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationFailed(message, code=error_code)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message, code=error_code)
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return NotImplementedByUpstream(message, code=error_code)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return UpstreamTimeout(message, code=error_code)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return UpstreamUnavailable(message, code=error_code, retry_after_s=retry_after_s)
    return GatewayError(message, code=error_code)


class _RichDetails:
    """The parts of google.rpc.Status details the gateway can pass on."""

    def __init__(self) -> None:
        self.field: str | None = None
        self.reason: str | None = None
        self.retry_delay_s: float | None = None

    @classmethod
    def from_trailers(cls, trailers: grpc.aio.Metadata | None) -> _RichDetails:
        found = cls()
        raw = _metadata_value(trailers, _STATUS_DETAILS_KEY)
        if not isinstance(raw, bytes):
            return found
        try:
            status = status_pb2.Status.FromString(raw)
        except Exception:  # malformed details must not hide the status itself
            return found
        for detail in status.details:
            bad_request = error_details_pb2.BadRequest()
            error_info = error_details_pb2.ErrorInfo()
            retry_info = error_details_pb2.RetryInfo()
            if detail.Unpack(bad_request) and bad_request.field_violations:
                found.field = bad_request.field_violations[0].field or None
            elif detail.Unpack(error_info):
                found.reason = error_info.reason.lower() or None
                found.field = found.field or error_info.metadata.get("field") or None
            elif detail.Unpack(retry_info) and retry_info.HasField("retry_delay"):
                found.retry_delay_s = retry_info.retry_delay.ToTimedelta().total_seconds()
        return found


def _retry_after_s(trailers: grpc.aio.Metadata | None, details: _RichDetails) -> int | None:
    """Whole seconds to wait, from `retry-after-ms`, `retry-after` or RetryInfo."""
    for key, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = _metadata_value(trailers, key)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except (TypeError, ValueError):
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return math.ceil(seconds)
    if details.retry_delay_s is not None:
        return math.ceil(details.retry_delay_s)
    return None


def _metadata_value(metadata: grpc.aio.Metadata | None, key: str) -> str | bytes | None:
    if not metadata:
        return None
    for item_key, value in metadata:
        if item_key == key:
            return value
    return None
