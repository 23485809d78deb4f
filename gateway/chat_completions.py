"""Drives one upstream Generate call into an OpenAI answer, whole or streamed.

The call is always cancelled when the HTTP side stops caring. Until the response starts,
a watcher on the ASGI receive channel notices a disconnect; once an SSE stream runs,
Starlette notices it and cancels the stream, whose `finally` cancels the call. Cancelling
an already finished call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import structlog
from starlette.types import Receive

from autoglm.inference.v1 import inference_service_pb2 as pb

from .errors import ClientClosedRequest, GatewayError, UpstreamUnavailable, error_from_rpc
from .response_building import (
    SSE_DONE,
    ChunkBuilder,
    CompletionAccumulator,
    sse_event,
)
from .structured import StructuredPlan

log = structlog.get_logger(__name__)


class _CancelledUpstream(UpstreamUnavailable):
    def __init__(self) -> None:
        super().__init__("generation was cancelled by the inference service", code="cancelled")


async def complete(
    call: grpc.aio.UnaryStreamCall,
    *,
    model: str,
    default_retry_after_s: int,
    receive: Receive,
    structured: StructuredPlan | None = None,
) -> dict[str, Any]:
    """Read the whole stream and build a `chat.completion` object."""
    accumulator = CompletionAccumulator(
        wants_logprobs=bool(structured and structured.logprobs is not None),
        tool=structured.tool if structured else None)
    try:
        async with _cancelled_on_disconnect(call, receive):
            async for response in call:
                accumulator.add(response)
    except grpc.aio.AioRpcError as error:
        raise _located(error_from_rpc(error, default_retry_after_s=default_retry_after_s),
                       structured) from error
    finally:
        call.cancel()
    final = accumulator.final
    if final is None:
        raise GatewayError("the inference service ended the stream without a final message")
    if final.finish_reason == pb.FINISH_REASON_CANCELLED:
        raise _CancelledUpstream()
    _log_finished(accumulator.request_id, final, stream=False)
    return accumulator.to_openai(final, model=model, created=int(time.time()))


async def first_response(
    call: grpc.aio.UnaryStreamCall, *, default_retry_after_s: int, receive: Receive,
    structured: StructuredPlan | None = None,
) -> pb.GenerateResponse | None:
    """Wait for the first message, so that an upstream refusal becomes an HTTP status.

    Returns None when the stream is empty.
    """
    try:
        async with _cancelled_on_disconnect(call, receive):
            response = await call.read()
    except grpc.aio.AioRpcError as error:
        raise _located(error_from_rpc(error, default_retry_after_s=default_retry_after_s),
                       structured) from error
    except BaseException:
        call.cancel()
        raise
    return None if response is grpc.aio.EOF else response


async def stream(
    call: grpc.aio.UnaryStreamCall,
    first: pb.GenerateResponse | None,
    *,
    request_id: str,
    model: str,
    include_usage: bool,
    default_retry_after_s: int,
    structured: StructuredPlan | None = None,
    n: int = 1,
) -> AsyncIterator[bytes]:
    """SSE byte chunks: role, deltas, finish, optional usage, [DONE]. With n > 1 each
    choice's chunks carry its index, and each choice's finish chunk comes as it ends.

    Failures after the first byte cannot change the HTTP status any more; they are sent
    as an OpenAI error event, which OpenAI clients raise as an APIError.
    """
    chunks = ChunkBuilder(
        request_id=(first.request_id if first and first.request_id else request_id),
        model=model,
        created=int(time.time()),
        include_usage=include_usage,
        wants_logprobs=bool(structured and structured.logprobs is not None),
        tool=structured.tool if structured else None,
        n=n,
    )
    try:
        for role in chunks.role_chunks():
            yield sse_event(role)
        response = first
        while response is not None:
            delta = chunks.delta_chunk(response)
            if delta is not None:
                yield sse_event(delta)
            end = response.choice_end if response.HasField("choice_end") else None
            if end is not None and end.finish_reason != pb.FINISH_REASON_CANCELLED:
                yield sse_event(chunks.finish_chunk(end.finish_reason, end.index))
            if response.HasField("final"):
                async for event in _final_events(chunks, response.final):
                    yield event
                return
            response = await _next(call)
        yield sse_event(
            GatewayError("the inference service ended the stream without a final message").to_body()
        )
    except grpc.aio.AioRpcError as error:
        gateway_error = error_from_rpc(error, default_retry_after_s=default_retry_after_s)
        log.warning("stream_failed", request_id=chunks.request_id, grpc_code=error.code().name)
        yield sse_event(gateway_error.to_body())
    finally:
        call.cancel()


async def _final_events(chunks: ChunkBuilder, final: pb.FinalMessage) -> AsyncIterator[bytes]:
    _log_finished(chunks.request_id, final, stream=True)
    if final.finish_reason == pb.FINISH_REASON_CANCELLED:
        yield sse_event(_CancelledUpstream().to_body())
        return
    if not final.choices:  # n = 1: the final carries the only finish reason
        yield sse_event(chunks.finish_chunk(final.finish_reason))
    if chunks.include_usage:
        yield sse_event(chunks.usage_chunk(final))
    yield SSE_DONE


def _located(error: GatewayError, structured: StructuredPlan | None) -> GatewayError:
    """An upstream error about the response format names the request field it came from
    (response_format..., or the tool's parameters)."""
    if (structured is not None and structured.schema_param and error.param
            and error.param.startswith("sampling.response_format")):
        error.param = structured.schema_param
    return error


async def _next(call: grpc.aio.UnaryStreamCall) -> pb.GenerateResponse | None:
    response = await call.read()
    return None if response is grpc.aio.EOF else response


@contextlib.asynccontextmanager
async def _cancelled_on_disconnect(
    call: grpc.aio.UnaryStreamCall, receive: Receive
) -> AsyncIterator[None]:
    """Cancel `call` if the HTTP client disconnects while the block runs."""

    async def cancel_when_disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        call.cancel()
        log.info("client_disconnected", rpc="Generate")

    watcher = asyncio.create_task(cancel_when_disconnected())
    try:
        yield
    except (asyncio.CancelledError, grpc.aio.AioRpcError) as error:
        # A call we cancelled ends with CancelledError; nobody is left to answer to.
        if watcher.done() and not watcher.cancelled():
            raise ClientClosedRequest("client closed the request") from error
        raise
    finally:
        watcher.cancel()


def _log_finished(request_id: str, final: pb.FinalMessage, *, stream: bool) -> None:
    log.info(
        "chat_completion",
        request_id=request_id,
        stream=stream,
        finish_reason=pb.FinishReason.Name(final.finish_reason),
        prompt_tokens=final.usage.prompt_tokens,
        completion_tokens=final.usage.completion_tokens,
        cached_prompt_tokens=final.usage.cached_prompt_tokens,
    )
