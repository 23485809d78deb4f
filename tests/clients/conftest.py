"""Fixtures of the client tests: the shared fake inference service (echoing the prompt) and
the fake control servicer of client_fakes.py, on one loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_fakes import FakeControlServicer

from tests.support.fake_inference import (
    FakeInferenceService,
    FakeUpstream,
    echo,
    start_fake_upstream,
)


@pytest.fixture(scope="module")
def control_double() -> FakeControlServicer:
    return FakeControlServicer()


@pytest.fixture(scope="module")
def fake_server(control_double: FakeControlServicer) -> Iterator[FakeUpstream]:
    """A loopback gRPC server running both fakes (test doubles, not the service)."""
    upstream = start_fake_upstream(control=control_double)
    yield upstream
    upstream.server.stop(grace=None)


@pytest.fixture
def fake_service(fake_server: FakeUpstream) -> FakeInferenceService:
    """The fake inference service, reset for one test: it echoes the prompt."""
    fake_server.service.reset(echo)
    return fake_server.service


@pytest.fixture
def fake_control(control_double: FakeControlServicer) -> FakeControlServicer:
    """The fake control servicer, reset for one test."""
    control_double.state.admission = None
    return control_double
