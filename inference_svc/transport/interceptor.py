"""One interceptor for every RPC: request ids, canonical log lines, error -> status.

It wraps unary-unary, unary-stream and stream-stream (GenerateLive) handlers."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from autoglm_common.bounds import clip
from autoglm_common.ids import is_request_id
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
FIELD_BYTES = 256  # field paths are ours, but may index deep into a request
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
        if key == "x-request-id" and is_request_id(value):
            return value
    return uuid.uuid4().hex


def rich_status(error: ServiceError) -> grpc.Status:
    code = next((c for cls, c in STATUS_OF if isinstance(error, cls)), grpc.StatusCode.INTERNAL)
    message, field = clip(error.message), clip(error.field, FIELD_BYTES)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN)
    if field:
        info.metadata["field"] = field
    details = [info]
    trailing: list[tuple[str, str]] = []
    if isinstance(error, ResourceExhausted):
        info.metadata["resource"] = clip(error.resource)
        millis = int(error.retry_after_s * 1000)
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(millis)
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        trailing.append(("retry-after-ms", str(millis)))
    if field and isinstance(error, InvalidRequest):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
        ]))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = rpc_status.to_status(
        status_pb2.Status(code=code_pb2.Code.Value(code.name), message=message,
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
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_stream or handler.stream_stream:
            takes_stream = handler.stream_stream is not None
            inner_stream = handler.stream_stream or handler.unary_stream

            async def stream(request, context):
                started = _begin(context, method)
                call = structlog.contextvars.get_contextvars()
                try:
                    requests = _each_decoded(request) if takes_stream else _decoded(request)
                    async for response in inner_stream(requests, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, method, started, error)
                except BaseException:  # CancelledError, GeneratorExit: the call ended under us
                    self._cut_short(context, method, started, call)
                    raise
                if context.cancelled():
                    self._cut_short(context, method, started, call)
                    return
                self._count(method, "OK")
                _end(context, method, started)

            wrap = (grpc.stream_stream_rpc_method_handler if takes_stream
                    else grpc.unary_stream_rpc_method_handler)
            return wrap(stream, request_deserializer=deserialize,
                        response_serializer=handler.response_serializer)
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary(request, context):
                started = _begin(context, method)
                call = structlog.contextvars.get_contextvars()
                try:
                    response = await inner_unary(_decoded(request), context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:
                    await self._fail(context, method, started, error)
                except BaseException:  # CancelledError: the client cancelled or timed out
                    self._cut_short(context, method, started, call)
                    raise
                self._count(method, "OK")
                _end(context, method, started)
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserialize,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _cut_short(self, context: grpc.aio.ServicerContext, method: str, started: float,
                   call: dict[str, object]) -> None:
        """The client cancelled or its deadline passed while the handler ran: count and log
        it as the client saw it. This may run outside the call's context (a stream closed
        by the garbage collector), so the log line names its call itself."""
        remaining = context.time_remaining()
        code = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
        self._count(method, code)
        log.info("rpc_finished", status=code, seconds=round(time.monotonic() - started, 4),
                 cancelled=True, **call)

    async def _fail(self, context, method: str, started: float, error: Exception) -> None:
        """Abort the call with the status the error deserves (never returns)."""
        if isinstance(error, ServiceError):
            self._count(method, rich_status(error).code.name)
            await _abort(context, error, method, started)
        self._count(method, "INTERNAL")
        await _internal(context, method)


class _Undecodable:
    """Stands in for a request whose bytes do not parse; the handler turns it into an error.

    grpc runs the deserializer before any handler, and an exception there reaches the
    client as UNKNOWN; returning this instead lets the call fail with INVALID_ARGUMENT.
    """

    def __init__(self, message_name: str, error: Exception) -> None:
        reason = str(error).rpartition("': ")[2] or "cannot parse"
        self.error = InvalidRequest(f"request is not a valid {message_name}: {reason}")


def _tolerant(
    deserialize: Callable[[bytes], object] | None,
) -> Callable[[bytes], object] | None:
    if deserialize is None:
        return None
    message_type = getattr(deserialize, "__self__", None)
    descriptor = getattr(message_type, "DESCRIPTOR", None)
    name = descriptor.name if descriptor is not None else "request message"

    def tolerant(data: bytes) -> object:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError) as error:  # the latter: pure-Python protobuf
            return _Undecodable(name, error)

    return tolerant


def _decoded(request: object) -> object:
    if isinstance(request, _Undecodable):
        raise request.error
    return request


async def _each_decoded(requests: AsyncIterator[object]) -> AsyncIterator[object]:
    async for request in requests:
        yield _decoded(request)


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
    log.info("rpc_finished", status=status.code.name, reason=error.reason,
             error=clip(error.message), seconds=round(time.monotonic() - started, 4))
    await context.abort_with_status(status)


async def _internal(context, method: str) -> None:
    log.exception("rpc_failed", status="INTERNAL")
    request_id = structlog.contextvars.get_contextvars().get("request_id", "")
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})",
                        trailing_metadata=_request_id_metadata())
