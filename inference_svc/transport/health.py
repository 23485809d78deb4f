"""grpc.health.v1 for one listener: only the services that listener serves, and List.

Each listener (public, control) gets its own servicer, so the public port never answers
SERVING for the control service and the control listener never for InferenceService.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class ListenerHealth(health.aio.HealthServicer):
    """Health of the overall server ("") and of `services`, as served on one listener."""

    def __init__(self, *services: str) -> None:
        super().__init__()
        self.services = ("", *services)

    async def set_all(self, serving: bool) -> None:
        for name in self.services:
            await self.set(name, SERVING if serving else NOT_SERVING)

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        """A snapshot of every service's status on this listener (grpc.health.v1 List)."""
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()
        })
