"""Fixtures of the client tests: the fake servers of client_fakes.py on a loopback port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from client_fakes import FakeServer, FakeState, start_fake_server


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeServer]:
    """A loopback gRPC server running both fake servicers (a test double, not the service)."""
    server, fake = start_fake_server()
    yield fake
    server.stop(grace=None)


@pytest.fixture
def fake_state(fake_server: FakeServer) -> FakeState:
    """The fake's state, reset for one test."""
    fake_server.state = FakeState()
    return fake_server.state
