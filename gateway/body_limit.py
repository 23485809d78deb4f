"""ASGI middleware that answers 413 before a too-large body is parsed."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import PayloadTooLarge


class BodySizeLimitMiddleware:
    """Rejects bodies over `max_body_bytes`: by Content-Length when declared, else by count.

    The body is read here (every route with a body parses all of it anyway) and replayed
    to the app; an undeclared (chunked) upload is refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(send)
            return
        body_messages: list[Message] = []
        received = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                body_messages.append(message)
                break
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                await self._reject(send)
                return
            body_messages.append(message)
            more_body = message.get("more_body", False)

        async def replaying_receive() -> Message:
            if body_messages:
                return body_messages.pop(0)
            return await receive()

        await self.app(scope, replaying_receive, send)

    async def _reject(self, send: Send) -> None:
        error = PayloadTooLarge(
            f"request body exceeds the limit of {self.max_body_bytes} bytes",
            code="request_too_large",
        )
        body = json.dumps(error.to_body()).encode()
        headers: list[tuple[bytes, Any]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
