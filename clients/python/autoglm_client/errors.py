"""Client-side exceptions: gRPC failures mapped to one class per status code.

The server may attach a retry hint two ways: a `retry-after-ms` trailing metadata entry
(or a proxy's `retry-after` in whole seconds), or a `google.rpc.RetryInfo` in the rich
status details (`grpc-status-details-bin`). Both are read; the metadata entry wins when
both are present. The rich details also name the error's reason (`ErrorInfo`) and the
request field it is about (`BadRequest`, else the `ErrorInfo`'s "field").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

RETRY_AFTER_KEY = "retry-after-ms"
RETRY_AFTER_SECONDS_KEY = "retry-after"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

Metadata = Iterable[tuple[str, str | bytes]]
_Detail = TypeVar("_Detail", bound=Message)


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
        reason: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.field_violations = field_violations
        self.reason = reason  # the server's ErrorInfo reason, e.g. KV_BUDGET_EXHAUSTED
        self.field = field  # the request field the error is about


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
    details = _RichDetails.from_metadata(metadata)
    retry_after_s = _retry_after_from_metadata(metadata)
    error_class = _ERROR_CLASS_BY_CODE.get(code, RpcError)
    return error_class(
        code,
        message,
        retry_after_s=details.retry_delay_s if retry_after_s is None else retry_after_s,
        request_id=_text_value(metadata, REQUEST_ID_KEY),
        field_violations=details.field_violations,
        reason=details.reason,
        field=details.field,
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
    for key, scale in ((RETRY_AFTER_KEY, 1000.0), (RETRY_AFTER_SECONDS_KEY, 1.0)):
        raw = _text_value(metadata, key)
        if raw is None:
            continue
        try:
            seconds = float(raw) / scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


@dataclass(frozen=True, slots=True)
class _RichDetails:
    """What the `google.rpc.Status` details of a failed call say."""

    retry_delay_s: float | None = None
    field_violations: tuple[tuple[str, str], ...] = ()
    reason: str | None = None
    info_field: str | None = None

    @property
    def field(self) -> str | None:
        if self.field_violations and self.field_violations[0][0]:
            return self.field_violations[0][0]
        return self.info_field

    @classmethod
    def from_metadata(cls, metadata: list[tuple[str, str | bytes]]) -> _RichDetails:
        raw = next((value for key, value in metadata if key == STATUS_DETAILS_KEY), None)
        if not isinstance(raw, bytes):
            return cls()
        try:
            return cls._parse(status_pb2.Status.FromString(raw))
        except DecodeError:  # a malformed trailer must not hide the real error
            return cls()

    @classmethod
    def _parse(cls, status: status_pb2.Status) -> _RichDetails:
        retry_info = _detail(status, error_details_pb2.RetryInfo)
        bad_request = _detail(status, error_details_pb2.BadRequest)
        error_info = _detail(status, error_details_pb2.ErrorInfo)
        return cls(
            retry_delay_s=(retry_info.retry_delay.ToTimedelta().total_seconds()
                           if retry_info.HasField("retry_delay") else None),
            field_violations=tuple((v.field, v.description) for v in bad_request.field_violations),
            reason=error_info.reason or None,
            info_field=error_info.metadata.get("field") or None,
        )


def _detail(status: status_pb2.Status, message_type: type[_Detail]) -> _Detail:
    """The status's first detail of `message_type`; an empty one when it has none."""
    message = message_type()
    for detail in status.details:
        if detail.Unpack(message):
            break
    return message
