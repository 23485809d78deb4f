"""The README's configuration tables are the ones the settings dataclasses generate."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import get_type_hints

import pytest

from autoglm_settings import settings
from gateway.config import GatewayConfig
from inference_svc.config import ServerConfig
from memory_daemon.config import DaemonConfig

ROOT = Path(__file__).resolve().parents[2]
# what a request sets for itself: no service default to configure
PER_REQUEST = {("defaults", name) for name in ("seed", "stop_sequences", "response_format",
                                               "logprobs")}


def load_generator():
    spec = importlib.util.spec_from_file_location("config_tables",
                                                  ROOT / "docs" / "config_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_dataclasses():
    generator = load_generator()
    text = (ROOT / "README.md").read_text()
    assert generator.with_tables(text) == text, (
        f"README.md's configuration tables are stale: run `{generator.COMMAND}`")


def leaf_paths(cls: type, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    hints = get_type_hints(cls)
    paths: set[tuple[str, ...]] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths |= leaf_paths(hints[f.name], (*path, f.name))
        else:
            paths.add((*path, f.name))
    return paths


@pytest.mark.parametrize(("cls", "not_settings"), [(ServerConfig, PER_REQUEST),
                                                   (DaemonConfig, set()),
                                                   (GatewayConfig, set())])
def test_every_field_is_a_setting(cls, not_settings):
    declared = {s.path for s in settings(cls)}
    assert declared == leaf_paths(cls) - not_settings
    assert not_settings <= leaf_paths(cls)


@pytest.mark.parametrize("cls", [ServerConfig, DaemonConfig, GatewayConfig])
def test_flags_and_environment_names_are_unique_within_a_process(cls):
    flags = [flag for s in settings(cls) for flag in s.flags]
    names = [s.name for s in settings(cls)]
    assert len(flags) == len(set(flags))
    assert len(names) == len(set(names))
