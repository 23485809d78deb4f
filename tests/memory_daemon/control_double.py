"""A small in-test ControlService: records calls, checks the token, can fail on purpose.

`RecordingControl` lacks WatchMemory (UNIMPLEMENTED, as a service that predates it);
`WatchingControl` streams its status.
"""

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from autoglm.control.v1 import control_service_pb2 as pb
from autoglm.control.v1 import control_service_pb2_grpc as pb_grpc


class RecordingControl(pb_grpc.ControlServiceServicer):
    def __init__(self, token: str = "", pid: int = 0) -> None:
        self.token = token
        self.pid = pid
        self.calls: list[tuple[str, object]] = []
        self.fail_next = 0
        self.admission = pb.ADMISSION_MODE_OPEN
        self.admission_limit = 0
        self.modules: list[pb.ModuleResidency] = []
        self.devices: list[pb.DeviceMemory] = []

    async def _enter(self, name: str, request: object, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        if self.token and metadata.get("authorization") != f"Bearer {self.token}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        self.calls.append((name, request))
        if self.fail_next:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    def actions(self) -> list[tuple[str, object]]:
        reads = ("GetMemoryStatus", "WatchMemory")
        return [(name, request) for name, request in self.calls if name not in reads]

    def count(self, name: str) -> int:
        return sum(1 for called, _ in self.calls if called == name)

    def status(self) -> pb.MemoryStatus:
        return pb.MemoryStatus(
            pid=self.pid, admission_mode=self.admission, admission_limit=self.admission_limit,
            modules=self.modules, devices=self.devices,
        )

    async def GetMemoryStatus(self, request, context):
        await self._enter("GetMemoryStatus", request, context)
        return pb.GetMemoryStatusResponse(status=self.status())

    async def CollectGarbage(self, request, context):
        await self._enter("CollectGarbage", request, context)
        return pb.CollectGarbageResponse(result=pb.ActionResult(freed_bytes=123, detail="gc"))

    async def TrimKvCache(self, request, context):
        await self._enter("TrimKvCache", request, context)
        freed = request.target_bytes
        return pb.TrimKvCacheResponse(result=pb.ActionResult(freed_bytes=freed), sessions=["s1"])

    async def OffloadModules(self, request, context):
        await self._enter("OffloadModules", request, context)
        return pb.OffloadModulesResponse(result=pb.ActionResult(freed_bytes=1000))

    async def ReloadModules(self, request, context):
        await self._enter("ReloadModules", request, context)
        return pb.ReloadModulesResponse(result=pb.ActionResult())

    async def SetAdmission(self, request, context):
        await self._enter("SetAdmission", request, context)
        self.admission, self.admission_limit = request.mode, request.max_running
        return pb.SetAdmissionResponse(
            mode=request.mode, max_running=request.max_running, result=pb.ActionResult()
        )


class WatchingControl(RecordingControl):
    """Pushes its status on subscribe and then on every `push()` (the test is the clock)."""

    def __init__(self, token: str = "", pid: int = 0) -> None:
        super().__init__(token, pid)
        self.pushed = 0
        self.open_streams = 0
        self.subscribed = asyncio.Event()
        self._wake = asyncio.Condition()

    async def push(self) -> None:
        async with self._wake:
            self._wake.notify_all()

    async def WatchMemory(self, request, context):
        await self._enter("WatchMemory", request, context)
        self.subscribed.set()
        self.open_streams += 1
        try:
            while True:
                self.pushed += 1
                yield pb.WatchMemoryResponse(status=self.status())
                async with self._wake:
                    await self._wake.wait()
        finally:
            self.open_streams -= 1


async def start_control(
    servicer: RecordingControl,
    address: str,
    health_servicer: health.aio.HealthServicer | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve on `address` ("unix:/path" or "127.0.0.1:0"); returns the server and port."""
    server = grpc.aio.server()
    pb_grpc.add_ControlServiceServicer_to_server(servicer, server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    await server.start()
    return server, port
