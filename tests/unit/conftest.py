"""Fixtures of the unit tests: the tiny model, loaded once per module."""

from __future__ import annotations

import pytest

from inference_svc.model.modular import ModularModel


@pytest.fixture(scope="module")
def model(tiny_bundle) -> ModularModel:
    return ModularModel(tiny_bundle)
