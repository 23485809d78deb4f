"""The gateway's one gRPC channel to the inference service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
from autoglm_client.channel import CallDefaults, open_aio_channel, tls_credentials
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc

from .config import GatewayConfig

INFERENCE_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
UNREACHABLE = "UNREACHABLE"
_Stub = TypeVar("_Stub")


def _credentials(config: GatewayConfig) -> grpc.ChannelCredentials | None:
    if not config.upstream_tls:
        return None
    return tls_credentials(config.upstream_tls_ca, config.upstream_tls_cert,
                           config.upstream_tls_key)


class UpstreamNotOpen(RuntimeError):
    """A call was attempted outside the app's lifespan."""


class InferenceUpstream:
    """Owns the `grpc.aio` channel; open it inside the serving event loop."""

    def __init__(self, config: GatewayConfig) -> None:
        self._config = config
        self._call_defaults = CallDefaults(timeout=config.request_timeout_s)
        self._channel: grpc.aio.Channel | None = None
        self._inference: pb_grpc.InferenceServiceStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    async def open(self) -> None:
        self._channel = open_aio_channel(self._config.upstream_target,
                                         _credentials(self._config))
        self._inference = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    def generate(self, request: pb.GenerateRequest, *, request_id: str) -> grpc.aio.UnaryStreamCall:
        """Start a Generate call; the caller reads it and must cancel it when abandoned.

        A session id also travels as metadata, for a proxy's session affinity (deploy/nginx).
        """
        return self._require(self._inference).Generate(
            request, **self._call_defaults.call_kwargs(None, request_id, request.session_id)
        )

    def generate_live(self, requests: AsyncIterator[pb.GenerateLiveRequest], *,
                      request_id: str, session_id: str,
                      timeout: float | None) -> grpc.aio.StreamStreamCall:
        """Start a GenerateLive call that sends `requests`; the caller reads it and must
        cancel it when abandoned."""
        return self._require(self._inference).GenerateLive(
            requests, **self._call_defaults.call_kwargs(timeout, request_id, session_id)
        )

    async def end_session(self, session_id: str) -> None:
        """Drop a session's cached state (its KV) in the service."""
        await self._require(self._inference).EndSession(
            pb.EndSessionRequest(session_id=session_id), timeout=self._config.health_timeout_s
        )

    async def serving_status(self) -> str:
        """The inference service's health status name, or UNREACHABLE.

        Asks for the InferenceService by name; a server that registers only the overall
        ("") status is asked for that instead.
        """
        try:
            try:
                response = await self._check(INFERENCE_SERVICE_NAME)
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.NOT_FOUND:
                    raise
                response = await self._check("")
        except grpc.aio.AioRpcError:
            return UNREACHABLE
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def _check(self, service: str) -> health_pb2.HealthCheckResponse:
        return await self._require(self._health).Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self._config.health_timeout_s,
        )

    @staticmethod
    def _require(stub: _Stub | None) -> _Stub:
        if stub is None:
            raise UpstreamNotOpen("the upstream channel is opened by the app's lifespan")
        return stub
