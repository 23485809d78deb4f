"""serve(): assembles the gRPC servers, loads the model, and shuts down gracefully.

Health stays NOT_SERVING until the model is loaded and the engine runs. SIGTERM flips
health to NOT_SERVING, stops accepting calls, lets in-flight streams finish within the
grace period, then ends the rest with a final CANCELLED message carrying their usage.
A watchdog ends the process (non-zero) if the model loop dies or stalls.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import replace

import grpc
import structlog
from grpc_health.v1 import health, health_pb2_grpc

from autoglm.control.v1 import control_service_pb2 as control_pb
from autoglm.control.v1 import control_service_pb2_grpc as control_grpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from inference_svc.config import ServerConfig, TlsFiles
from inference_svc.control.servicer import ControlServicer, TokenAuthInterceptor
from inference_svc.engine.compute_threads import leave_cores_to_the_model_loop
from inference_svc.engine.engine import Engine
from inference_svc.loading import kv_budget_bytes, load_model
from inference_svc.memory.residency import ResidencyPolicy
from inference_svc.metrics import ServiceMetrics
from inference_svc.process_memory import freeze_startup_objects
from inference_svc.service_state import ServiceState
from inference_svc.transport.health import ListenerHealth
from inference_svc.transport.inference_servicer import InferenceServicer
from inference_svc.transport.interceptor import ServiceInterceptor
from inference_svc.transport.reflection import enable_reflection
from inference_svc.transport.reflection_docs import DocumentedPool
from inference_svc.transport.tls import add_port
from inference_svc.watchdog import EXIT_CODE as WATCHDOG_EXIT_CODE
from inference_svc.watchdog import Watchdog

log = structlog.get_logger(__name__)
INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
CONTROL_SERVICE = control_pb.DESCRIPTOR.services_by_name["ControlService"].full_name
FLUSH_SECONDS = 2.0  # after the grace period, for the engine's CANCELLED finals to go out


def server_options(config: ServerConfig, *, public: bool) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", config.max_concurrent_streams),
        ("grpc.keepalive_time_ms", _ms(config.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(config.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", int(config.keepalive_permit_without_calls)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _ms(config.min_ping_interval_s)),
        ("grpc.http2.max_ping_strikes", config.max_ping_strikes),
    ]
    # Only the public port sits behind load balancers; aging the control listener's
    # connections would just break the memory daemon's WatchMemory stream.
    if public and config.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", _ms(config.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", _ms(config.max_connection_age_grace_s)),
        ]
    return options


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _tls_mode(files: TlsFiles | None) -> str:
    if files is None:
        return "off"
    return "mtls" if files.client_ca else "tls"


class Service:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.state = ServiceState(config)
        self.metrics = ServiceMetrics(self.state)
        self.state.metrics = self.metrics
        # one health servicer per listener: each reports only the services it serves
        self.health = ListenerHealth(INFERENCE_SERVICE)
        self.control_health = ListenerHealth(CONTROL_SERVICE)
        self.descriptors = DocumentedPool()  # read once, served by both listeners
        interceptor = ServiceInterceptor(
            lambda method, code: self.metrics.rpcs.labels(method, code).inc())
        self.public = grpc.aio.server(interceptors=[interceptor],
                                      options=server_options(config, public=True))
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.state), self.public)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.public)
        enable_reflection(self.public, [INFERENCE_SERVICE, health.SERVICE_NAME],
                          self.descriptors)
        self.port = add_port(self.public, f"{config.host}:{config.port}", config.public_tls)
        self.control = self._control_server()
        self._background: list[asyncio.Task] = []
        self.halted = asyncio.Event()  # the watchdog found the model loop dead or stalled
        self.exit_code = 0

    def _control_server(self) -> grpc.aio.Server:
        config = self.config
        interceptors = [ServiceInterceptor()]
        if config.control_token:
            interceptors.insert(0, TokenAuthInterceptor(config.control_token))
        server = grpc.aio.server(interceptors=interceptors,
                                 options=server_options(config, public=False))
        self.control_servicer = ControlServicer(self.state)
        control_grpc.add_ControlServiceServicer_to_server(self.control_servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.control_health, server)
        enable_reflection(server, [CONTROL_SERVICE, health.SERVICE_NAME], self.descriptors)
        if config.control_socket:
            path = config.control_socket
            if os.path.exists(path):
                os.unlink(path)
            previous = os.umask(0o177)  # the socket is born 0600: no window for other users
            try:
                server.add_insecure_port(f"unix://{path}")
            finally:
                os.umask(previous)
        if config.control_tcp:
            add_port(server, config.control_tcp, config.control_tls)
        return server

    async def _set_health(self, serving: bool) -> None:
        await self.health.set_all(serving)
        await self.control_health.set_all(serving)

    async def start(self) -> None:
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        await self._set_health(False)
        await self.public.start()
        await self.control.start()
        if self.config.control_socket and os.path.exists(self.config.control_socket):
            os.chmod(self.config.control_socket, 0o600)
        config = self.config
        log.info("listening", port=self.port, control_socket=config.control_socket,
                 control_tcp=config.control_tcp or None, tls=_tls_mode(config.public_tls),
                 control_tcp_tls=_tls_mode(config.control_tls) if config.control_tcp else None)
        self._write_port_file(serving=False)
        model = await asyncio.to_thread(load_model, config)
        # off the event loop: capturing CUDA graphs or compiling host steps takes a while,
        # and health checks must answer NOT_SERVING meanwhile, not time out
        engine = await asyncio.to_thread(
            Engine, model, replace(config.engine, kv_budget_bytes=kv_budget_bytes(config, model)),
            observer=self.metrics)
        engine.start()
        self.state.engine = engine
        if config.watchdog_timeout_s > 0:
            watchdog = Watchdog(engine, stall_timeout_s=config.watchdog_timeout_s,
                                on_fault=self._halt)
            self._background.append(asyncio.create_task(watchdog.run()))
        if config.encoder_idle_offload_s > 0:
            policy = ResidencyPolicy(engine, idle_seconds=config.encoder_idle_offload_s)
            self._background.append(asyncio.create_task(policy.run()))
        log.info("startup_objects_frozen", objects=freeze_startup_objects())
        await self._set_health(True)
        self._write_port_file(serving=True)
        log.info("serving", port=self.port)

    def _write_port_file(self, *, serving: bool) -> None:
        """Tell a supervisor (or a test) where we listen, atomically."""
        if not self.config.port_file:
            return
        staging = self.config.port_file.with_suffix(".tmp")
        staging.write_text(json.dumps({
            "port": self.port, "control_socket": self.config.control_socket,
            "pid": os.getpid(), "serving": serving,
        }))
        staging.replace(self.config.port_file)

    async def _halt(self, fault: str) -> None:
        await self._set_health(False)
        self.exit_code = WATCHDOG_EXIT_CODE
        self.halted.set()

    async def stop(self) -> None:
        """Stop accepting calls; streams get the grace period, then a CANCELLED final."""
        # after a watchdog halt the open streams have already been ended: no grace
        grace = 0.0 if self.halted.is_set() else self.config.grace_period_s
        log.info("shutting_down", grace_seconds=grace)
        await self.health.enter_graceful_shutdown()
        await self.control_health.enter_graceful_shutdown()
        self.control_servicer.close()
        for task in self._background:
            task.cancel()
        engine = self.state.engine
        if engine is not None:
            engine.close()
        # the servers refuse new calls at once; streams still open after the grace period
        # are ended by the engine below, and FLUSH_SECONDS lets their finals reach clients
        stopping = asyncio.gather(self.public.stop(grace + FLUSH_SECONDS),
                                  self.control.stop(grace + FLUSH_SECONDS))
        if engine is not None:
            deadline = asyncio.get_running_loop().time() + grace
            while not engine.idle and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(engine.stop, 1.0 if self.halted.is_set() else 10.0)
        await stopping
        if self.config.control_socket and os.path.exists(self.config.control_socket):
            os.unlink(self.config.control_socket)
        log.info("stopped")


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM/SIGINT (exit code 0) or a watchdog halt (non-zero)."""
    loop = asyncio.get_running_loop()
    leave_cores_to_the_model_loop(loop)
    service = Service(config)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(service.start())
    stopped = asyncio.create_task(stop.wait())
    halted = asyncio.create_task(service.halted.wait())
    await asyncio.wait({starting, stopped, halted}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done() and starting.exception() is not None:
        await service.stop()
        raise starting.exception()
    await asyncio.wait({stopped, halted}, return_when=asyncio.FIRST_COMPLETED)
    starting.cancel()
    await service.stop()
    return service.exit_code
