"""Fixtures for the gateway: the gRPC test double and real uvicorn gateways on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from gateway_harness import GatewayFactory, running_gateway

from gateway.config import GatewayConfig
from tests.support.fake_inference import FakeInferenceService, FakeUpstream, start_fake_upstream


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    upstream = start_fake_upstream()
    yield upstream
    upstream.server.stop(grace=None)


@pytest.fixture
def fake_service(fake_upstream: FakeUpstream) -> Iterator[FakeInferenceService]:
    fake_upstream.service.reset()
    fake_upstream.set_serving(True)
    yield fake_upstream.service
    fake_upstream.service.reset()


# Gateways are module-scoped: each runs grpc.aio on its own thread's event loop, which
# should not outlive this package's tests while other packages use grpc.aio themselves.
@pytest.fixture(scope="module")
def gateway_url(fake_upstream: FakeUpstream) -> Iterator[str]:
    """Base URL of a default gateway in front of the test double."""
    with running_gateway(GatewayConfig(upstream_target=fake_upstream.target)) as url:
        yield url


@pytest.fixture
def make_gateway(fake_upstream: FakeUpstream) -> GatewayFactory:
    """Starts a gateway with non-default settings (upstream defaults to the double)."""

    def factory(**settings: object) -> AbstractContextManager[str]:
        settings.setdefault("upstream_target", fake_upstream.target)
        return running_gateway(GatewayConfig(**settings))  # type: ignore[arg-type]

    return factory


@pytest.fixture(scope="module")
def real_gateway_url(inference_server: Any) -> Iterator[str]:
    """A default gateway in front of the real service (tests/conftest.py's tiny model)."""
    with running_gateway(GatewayConfig(upstream_target=inference_server.target)) as url:
        yield url
