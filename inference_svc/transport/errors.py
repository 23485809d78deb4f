"""One interceptor for every RPC: request ids, canonical log lines, error -> status."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from inference_svc.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModalityUnavailable,
    NotReady,
    ResourceExhausted,
    ServiceError,
    UnknownSession,
)

log = structlog.get_logger("rpc")
ERROR_DOMAIN = "autoglm.dev"
REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
STATUS_OF = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (ModalityUnavailable, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownSession, grpc.StatusCode.NOT_FOUND),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


def request_id_of(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def rich_status(error: ServiceError) -> grpc.Status:
    code = next((c for cls, c in STATUS_OF if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if error.field:
        info.metadata["field"] = error.field
    details = [info]
    trailing: list[tuple[str, str]] = []
    if isinstance(error, ResourceExhausted):
        info.metadata["resource"] = error.resource
        millis = int(error.retry_after_s * 1000)
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(millis)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        trailing.append(("retry-after-ms", str(millis)))
    if error.field and isinstance(error, InvalidRequest):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=error.field,
                                                        description=error.message)
        ]))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.Code.Value(code.name), message=error.message,
                          details=packed)
    )
    return _WithTrailing(status, trailing)


class _WithTrailing(grpc.Status):
    def __init__(self, status: grpc.Status, extra: list[tuple[str, str]]) -> None:
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = tuple(status.trailing_metadata) + tuple(extra)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Binds a request id, logs one line per call, maps domain errors to statuses."""

    def __init__(self, count: Callable[[str, str], None] | None = None) -> None:
        self._count = count or (lambda method, code: None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc."):
            return handler
        method = details.method
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def stream(request, context):
                started = _begin(context, method)
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, method, started, error)
                self._count(method, "CANCELLED" if context.cancelled() else "OK")
                _end(context, method, started)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                started = _begin(context, method)
                try:
                    response = await inner_unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, method, started, error)
                self._count(method, "OK")
                _end(context, method, started)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _fail(self, context, method: str, started: float, error: Exception) -> None:
        """Abort the call with the status the error deserves (never returns)."""
        if isinstance(error, ServiceError):
            self._count(method, rich_status(error).code.name)
            await _abort(context, error, method, started)
        self._count(method, "INTERNAL")
        await _internal(context, method)


def _begin(context: grpc.aio.ServicerContext, method: str) -> float:
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id_of(context), rpc=method)
    return time.monotonic()


def _request_id_metadata() -> tuple[tuple[str, str], ...]:
    return (("x-request-id", structlog.contextvars.get_contextvars().get("request_id", "")),)


def _end(context: grpc.aio.ServicerContext, method: str, started: float) -> None:
    context.set_trailing_metadata(_request_id_metadata())
    log.info("rpc_finished", status="OK", seconds=round(time.monotonic() - started, 4),
             cancelled=context.cancelled())


async def _abort(context, error: ServiceError, method: str, started: float) -> None:
    status = rich_status(error)
    status.trailing_metadata = (*status.trailing_metadata, *_request_id_metadata())
    log.info("rpc_finished", status=status.code.name, reason=error.reason, error=error.message,
             seconds=round(time.monotonic() - started, 4))
    await context.abort_with_status(status)


async def _internal(context, method: str) -> None:
    log.exception("rpc_failed", status="INTERNAL")
    request_id = structlog.contextvars.get_contextvars().get("request_id", "")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})",
                        trailing_metadata=_request_id_metadata())
