"""The gateway's access log and Prometheus metrics: one ASGI middleware sees every request.

Each request gets one `http_request` JSON line (method, path, route, status, duration,
request id) and is counted and timed by route and status, 4xx and 5xx included. A client
that goes away before its response ended (a closed stream, an abandoned wait) is logged
and counted with nginx's status 499 ("client closed request"), beside the status the
response had started with. The request id is the client's valid `x-request-id` or a new
one, given to the route (so the upstream call carries it) and echoed in the response.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from autoglm_common.ids import is_request_id

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("gateway.access")

CLIENT_CLOSED = 499  # nginx's code for a request whose client left before the response ended
UNMATCHED = "unmatched"  # the route label of paths no route serves (keeps the label set small)
# whole answers take seconds to minutes; /health and /v1/models milliseconds
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                    300, 600)


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "autoglm_gateway_http_requests", "HTTP requests finished, by route and status",
            ["method", "route", "status"], registry=self.registry)
        self.duration = Histogram(
            "autoglm_gateway_http_request_duration_seconds",
            "HTTP request start to the end of its response (streams included), by route",
            ["method", "route"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("autoglm_gateway_http_requests_in_flight",
                               "HTTP requests being served", registry=self.registry)
        self.realtime_sessions = Gauge(
            "autoglm_gateway_realtime_sessions", "Realtime WebSocket sessions open",
            registry=self.registry)
        self.realtime_live_streams = Gauge(
            "autoglm_gateway_realtime_live_streams",
            "GenerateLive calls open upstream for Realtime speech (sent as it is spoken)",
            registry=self.registry)
        self.realtime_responses = Counter(
            "autoglm_gateway_realtime_responses",
            "Realtime responses ended, by status and by how the speech reached the service "
            "(live: streamed while spoken; generate: sent whole)",
            ["status", "path"], registry=self.registry)
        info = Gauge("autoglm_gateway_info", "The model name this gateway serves",
                     ["model_name"], registry=self.registry)
        info.labels(model_name).set(1)

    async def endpoint(self, _: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class AccessLogMiddleware:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _adopt_request_id(scope)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.monotonic()
        seen = _Exchange()

        async def watched_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not seen.complete:
                seen.client_left = True
            return message

        async def watched_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(name.lower() == b"x-request-id" for name, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                seen.complete = True
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException:
            seen.status = seen.status or 500  # Starlette's outer layer answers 500
            raise
        finally:
            self.metrics.in_flight.dec()
            self._record(scope, request_id, seen, time.monotonic() - started)

    def _record(self, scope: Scope, request_id: str, seen: _Exchange, seconds: float) -> None:
        route = scope.get("route")
        route_path = getattr(route, "path", None) or UNMATCHED
        closed = seen.client_left or not seen.complete
        status = CLIENT_CLOSED if closed else seen.status
        method = scope["method"]
        self.metrics.requests.labels(method, route_path, str(status)).inc()
        self.metrics.duration.labels(method, route_path).observe(seconds)
        client = scope.get("client")
        fields: dict[str, Any] = {
            "method": method, "path": scope["path"], "route": route_path, "status": status,
            "duration_s": round(seconds, 4), "request_id": request_id,
            "client": f"{client[0]}:{client[1]}" if client else None,
        }
        if closed:
            fields["response_status"] = seen.status or None  # what had been started
        log.info("http_request", **fields)


class _Exchange:
    __slots__ = ("client_left", "complete", "status")

    def __init__(self) -> None:
        self.status = 0
        self.complete = False
        self.client_left = False


def _adopt_request_id(scope: Scope) -> str:
    """The client's valid x-request-id; else a new one, added to the request's headers so
    the route uses it too. An invalid one is left for the route to reject (400)."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            return text if is_request_id(text) else uuid.uuid4().hex
    request_id = uuid.uuid4().hex
    scope["headers"] = [*headers, (b"x-request-id", request_id.encode())]
    return request_id
