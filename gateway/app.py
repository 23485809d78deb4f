"""The FastAPI application: routes, authentication and error rendering."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import structlog
from fastapi import Depends, FastAPI, Header, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from autoglm_common.bounds import quote
from autoglm_common.ids import is_request_id

from . import chat_completions, realtime
from .body_limit import BodySizeLimitMiddleware
from .checks import check_api_key, check_model
from .config import GatewayConfig
from .errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    bad_request_from_validation,
)
from .observability import AccessLogMiddleware, GatewayMetrics
from .openai_schema import ChatCompletionRequest
from .request_mapping import to_generate_request
from .structured import plan as plan_structured
from .upstream import InferenceUpstream

log = structlog.get_logger(__name__)

_OWNER = "autoglm-serve"


def create_app(config: GatewayConfig) -> FastAPI:
    upstream = InferenceUpstream(config)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await upstream.open()
        log.info("gateway_started", upstream=config.upstream_target, model=config.served_model_name)
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(
        title="autoglm-serve OpenAI-compatible gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=config.max_body_bytes)
    # outermost: it sees every answer, the body limit's 413s and unknown routes included
    metrics = GatewayMetrics(config.served_model_name)
    app.add_middleware(AccessLogMiddleware, metrics=metrics)
    app.add_api_route("/metrics", metrics.endpoint, methods=["GET"], include_in_schema=False)
    _install_error_handlers(app)

    async def require_api_key(authorization: Annotated[str | None, Header()] = None) -> None:
        check_api_key(config, authorization)

    authenticated = [Depends(require_api_key)]

    def model_card() -> dict[str, Any]:
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": created,
            "owned_by": _OWNER,
        }

    @app.get("/v1/models", dependencies=authenticated)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=authenticated)
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        check_model(model_id, config, param=None)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        status = await upstream.serving_status()
        return JSONResponse(
            {"status": status, "upstream": config.upstream_target},
            status_code=200 if status == "SERVING" else 503,
        )

    @app.post("/v1/chat/completions", dependencies=authenticated, response_model=None)
    async def chat_completion(
        body: ChatCompletionRequest,
        request: Request,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> JSONResponse | StreamingResponse:
        check_model(body.model, config, param="model")
        structured = plan_structured(body)
        generate_request = to_generate_request(body, structured)
        request_id = _request_id(x_request_id)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, route="chat.completions")
        call = upstream.generate(generate_request, request_id=request_id)
        if not body.stream:
            completion = await chat_completions.complete(
                call,
                model=config.served_model_name,
                default_retry_after_s=config.default_retry_after_s,
                receive=request.receive,
                structured=structured,
            )
            return JSONResponse(completion, headers={"x-request-id": request_id})
        first = await chat_completions.first_response(
            call, default_retry_after_s=config.default_retry_after_s, receive=request.receive,
            structured=structured,
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = chat_completions.stream(
            call,
            first,
            request_id=request_id,
            model=config.served_model_name,
            include_usage=include_usage,
            default_retry_after_s=config.default_retry_after_s,
            structured=structured,
            n=generate_request.n or 1,
        )
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"x-request-id": request_id, "cache-control": "no-cache"},
        )

    @app.websocket("/v1/realtime")
    async def realtime_session(websocket: WebSocket) -> None:
        await realtime.serve(websocket, config=config, upstream=upstream, metrics=metrics)

    return app


def _request_id(incoming: str | None) -> str:
    if incoming is None:
        return uuid.uuid4().hex
    if not is_request_id(incoming):  # what the service accepts and metadata can carry
        raise BadRequest(
            "x-request-id must be 1-128 printable ASCII characters without spaces",
            param="x-request-id",
            code="invalid_value",
        )
    return incoming


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, error: GatewayError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error_response(bad_request_from_validation(error.errors(), skip="body"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            gateway_error: GatewayError = NotFound(
                f"Unknown route {request.method} {quote(request.url.path)}",
                code="unknown_url",
            )
        elif error.status_code == 405:
            gateway_error = MethodNotAllowed(
                f"Method {request.method} is not allowed on {quote(request.url.path)}",
                code="method_not_allowed",
            )
        else:
            gateway_error = _StarletteError(str(error.detail), status_code=error.status_code)
        return _error_response(gateway_error)

    @app.exception_handler(Exception)
    async def unexpected_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled_error")
        return _error_response(GatewayError("internal gateway error", code="internal_error"))


class _StarletteError(GatewayError):
    """Any other HTTP error Starlette raises, in OpenAI's shape."""

    def __init__(self, message: str, *, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error_type = "invalid_request_error" if status_code < 500 else "server_error"


def _error_response(error: GatewayError) -> JSONResponse:
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=error.headers())
