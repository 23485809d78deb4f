"""Fixtures for the gateway: the gRPC test double and real uvicorn gateways on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager

import pytest
from fake_inference_service import FakeInferenceService, FakeUpstream, start_fake_upstream
from gateway_harness import GatewayFactory, running_gateway

from inference_svc.http_gateway.config import GatewayConfig


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


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def real_upstream_target(request: pytest.FixtureRequest) -> str:
    """The real inference service (tests/conftest.py's `inference_server`), when present."""
    try:
        server = request.getfixturevalue("inference_server")
    except pytest.FixtureLookupError:
        pytest.skip("tests/conftest.py has no inference_server fixture yet")
    return server.target


@pytest.fixture(scope="session")
def real_gateway_url(real_upstream_target: str) -> Iterator[str]:
    with running_gateway(GatewayConfig(upstream_target=real_upstream_target)) as url:
        yield url
