"""Drives one upstream call (Generate, or a finished GenerateLive) into a Realtime
response's events: response.created; at the first reply the assistant item, its text
part and text deltas; then the item's and the part's ends and response.done with usage.

A response.cancel (or speech that interrupts it) cancels the call and the response ends
`cancelled`; an upstream error becomes an `error` event and a `failed` response.done whose
status_details carry it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog

from autoglm.inference.v1 import inference_service_pb2 as pb

from .errors import GatewayError, UpstreamUnavailable, error_from_rpc
from .realtime_conversation import Item
from .realtime_events import Event, RealtimeEvents, ResponseState, new_id

log = structlog.get_logger(__name__)

Send = Callable[[Event], Awaitable[None]]


class ResponseRun:
    def __init__(self, response: ResponseState, *, events: RealtimeEvents, send: Send,
                 on_item: Callable[[Item], str | None] | None, default_retry_after_s: int,
                 path: str) -> None:
        self.response = response
        self.cancel_requested = False
        self._cancel_reason = "client_cancelled"
        self._events = events
        self._send = send
        # adds the item to the conversation and returns the one before; None: out of band
        self._on_item = on_item
        self._default_retry_after_s = default_retry_after_s
        self.path = path  # "live" or "generate", for the log and the metrics
        self._call: grpc.aio.Call | None = None

    def cancel(self, reason: str = "client_cancelled") -> None:
        """Stop generating (response.cancel, or "turn_detected": the user spoke again); the
        response ends `cancelled` with `reason`."""
        self.cancel_requested = True
        self._cancel_reason = reason
        if self._call is not None:
            self._call.cancel()

    async def run(self, call: grpc.aio.Call) -> None:
        self._call = call
        if self.cancel_requested:  # before the task began
            call.cancel()
        response, events = self.response, self._events
        started = time.monotonic()
        item: Item | None = None
        previous_id: str | None = None
        text: list[str] = []
        final: pb.FinalMessage | None = None
        failure: GatewayError | None = None
        await self._send(events.response_created(response))
        try:
            while final is None:
                reply = await call.read()  # type: ignore[attr-defined]
                if reply is grpc.aio.EOF:
                    failure = GatewayError(
                        "the inference service ended the stream without a final message")
                    break
                if item is None:
                    item = Item(new_id("item"), "assistant", [], status="in_progress")
                    previous_id = self._on_item(item) if self._on_item else None
                    await self._start(item, previous_id)
                if reply.text_delta:
                    text.append(reply.text_delta)
                    await self._send(events.text_delta(response.id, item.id, reply.text_delta))
                if reply.HasField("final"):
                    final = reply.final
        except grpc.aio.AioRpcError as error:
            failure = error_from_rpc(error, default_retry_after_s=self._default_retry_after_s)
        except asyncio.CancelledError:
            # call.cancel() ends a pending read this way; a cancelled task still stops
            if not self.cancel_requested or _task_cancelling():
                raise
        finally:
            call.cancel()
        if final is not None and final.finish_reason == pb.FINISH_REASON_CANCELLED:
            failure = UpstreamUnavailable("generation was cancelled by the inference service",
                                          code="cancelled")
        self._conclude(final, failure)
        if item is not None:
            item.parts = ["".join(text)]
            item.status = "completed" if response.status == "completed" else "incomplete"
            response.output = [item]
            await self._finish(item, previous_id)
        if failure is not None:
            await self._send(events.error(failure, None))
        await self._send(events.response_done(response))
        log.info("realtime_response", response_id=response.id, path=self.path,
                 status=response.status, seconds=round(time.monotonic() - started, 4),
                 prompt_tokens=final.usage.prompt_tokens if final else None,
                 audio_tokens=final.usage.audio_tokens if final else None,
                 completion_tokens=final.usage.completion_tokens if final else None,
                 error=failure.code if failure else None)

    async def _start(self, item: Item, previous_id: str | None) -> None:
        response_id, events = self.response.id, self._events
        await self._send(events.output_item_added(response_id, item))
        if self._on_item is not None:
            for event in events.item_added(item, previous_id):
                await self._send(event)
        await self._send(events.content_part_added(response_id, item.id))

    async def _finish(self, item: Item, previous_id: str | None) -> None:
        response_id, events, text = self.response.id, self._events, "".join(item.parts)
        await self._send(events.text_done(response_id, item.id, text))
        await self._send(events.content_part_done(response_id, item.id, text))
        await self._send(events.output_item_done(response_id, item))
        if self._on_item is not None:
            for event in events.item_done(item, previous_id):
                await self._send(event)

    def _conclude(self, final: pb.FinalMessage | None, failure: GatewayError | None) -> None:
        response = self.response
        if failure is not None:
            response.status = "failed"
            response.status_details = {"type": "failed", "error": {
                "type": failure.error_type, "code": failure.code, "message": failure.message}}
        elif final is None:  # cancelled by the client before the final message
            response.status = "cancelled"
            response.status_details = {"type": "cancelled", "reason": self._cancel_reason}
        elif final.finish_reason == pb.FINISH_REASON_LENGTH:
            response.status = "incomplete"
            response.status_details = {"type": "incomplete", "reason": "max_output_tokens"}
        else:
            response.status = "completed"
        if final is not None:
            response.usage = final.usage


def _task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
