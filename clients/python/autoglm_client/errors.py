"""Client-side exceptions: gRPC failures mapped to one class per status code.

The server may attach a retry hint two ways: a `retry-after-ms` trailing metadata entry,
or a `google.rpc.RetryInfo` in the rich status details (`grpc-status-details-bin`).
Both are read; the metadata entry wins when both are present.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

RETRY_AFTER_KEY = "retry-after-ms"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

Metadata = Iterable[tuple[str, str | bytes]]


class AutoglmError(Exception):
    """Base class of every error this package raises."""


class InputError(AutoglmError, ValueError):
    """A value given to a builder cannot become a request part (unknown format, bad file)."""


class RpcError(AutoglmError):
    """An RPC ended with a non-OK status."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        retry_after_s: float | None = None,
        request_id: str | None = None,
        field_violations: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.field_violations = field_violations


class InvalidArgumentError(RpcError):
    """The request was rejected as malformed (bad image, bad parameters, ...)."""


class NotFoundError(RpcError):
    """A named thing (for example a session) does not exist."""


class ResourceExhaustedError(RpcError):
    """The server is out of capacity or the message is too large; see `retry_after_s`."""


class UnavailableError(RpcError):
    """The server cannot be reached or is not serving."""


class DeadlineExceededError(RpcError):
    """The call's deadline passed before it finished."""


class CancelledError(RpcError):
    """The call was cancelled."""


class AuthError(RpcError):
    """The caller is not authenticated or not allowed (control API token)."""


class FailedPreconditionError(RpcError):
    """The server is not in a state to run this call."""


_ERROR_CLASS_BY_CODE: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: AuthError,
    grpc.StatusCode.PERMISSION_DENIED: AuthError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
}


def error_from_status(
    code: grpc.StatusCode, message: str, trailing_metadata: Metadata | None
) -> RpcError:
    """Build the exception for a finished call from its status and trailers."""
    metadata = list(trailing_metadata or ())
    details = _rich_details(metadata)
    error_class = _ERROR_CLASS_BY_CODE.get(code, RpcError)
    return error_class(
        code,
        message,
        retry_after_s=_retry_after_from_metadata(metadata) or _retry_after_from(details),
        request_id=_text_value(metadata, REQUEST_ID_KEY),
        field_violations=_field_violations_from(details),
    )


def error_from_rpc_error(error: grpc.RpcError) -> RpcError:
    """Map a grpcio (sync or aio) RpcError to this package's exception."""
    return error_from_status(error.code(), error.details() or "", error.trailing_metadata())


def _text_value(metadata: list[tuple[str, str | bytes]], key: str) -> str | None:
    for entry_key, value in metadata:
        if entry_key == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


def _retry_after_from_metadata(metadata: list[tuple[str, str | bytes]]) -> float | None:
    raw = _text_value(metadata, RETRY_AFTER_KEY)
    if raw is None:
        return None
    try:
        return max(int(raw), 0) / 1000
    except ValueError:
        return None


def _rich_details(metadata: list[tuple[str, str | bytes]]) -> list:
    for key, value in metadata:
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            try:
                status.ParseFromString(value)
            except DecodeError:  # a malformed trailer must not hide the real error
                return []
            return list(status.details)
    return []


def _retry_after_from(details: list) -> float | None:
    for detail in details:
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(retry_info):
            return retry_info.retry_delay.ToTimedelta().total_seconds()
    return None


def _field_violations_from(details: list) -> tuple[tuple[str, str], ...]:
    for detail in details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            return tuple((v.field, v.description) for v in bad_request.field_violations)
    return ()
