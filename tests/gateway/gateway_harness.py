"""Runs the real gateway (uvicorn, loopback, ephemeral port) inside the test process."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import openai
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig

GatewayFactory = Callable[..., AbstractContextManager[str]]


@contextmanager
def running_gateway(config: GatewayConfig) -> Iterator[str]:
    """A real uvicorn server on an ephemeral port, in a thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(config), log_level="warning", timeout_graceful_shutdown=1)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    started = threading.Event()
    while not server.started and thread.is_alive():
        started.wait(0.01)
    if not server.started:
        raise RuntimeError("the gateway did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def openai_through_gateway(upstream_target: str) -> Iterator[openai.OpenAI]:
    """The `openai` SDK's client, through a real gateway in front of `upstream_target`."""
    with running_gateway(GatewayConfig(upstream_target=upstream_target)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
