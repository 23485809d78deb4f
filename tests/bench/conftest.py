"""Benchmark fixtures: the embedded default model, served every way it is compared."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench.in_process import InProcessDecoder
from tests.bench.openai_server import OpenAIServer, start_transformers_serve
from tests.conftest import ServerProcess, start_server


@pytest.fixture(scope="session")
def default_bundle() -> Path:
    from inference_svc.model.checkpoints.default_bundle import ensure_default_bundle

    return ensure_default_bundle()


@pytest.fixture(scope="session")
def decoder_dir(default_bundle: Path) -> Path:
    """The plain transformers checkpoint of the embedded decoder."""
    return default_bundle / "decoder"


@pytest.fixture(scope="session")
def generation_defaults(decoder_dir: Path) -> dict:
    """The decoder's special-token ids, which a full generation_config must carry."""
    config = json.loads((decoder_dir / "generation_config.json").read_text())
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


@pytest.fixture(scope="session")
def in_process(decoder_dir: Path) -> InProcessDecoder:
    return InProcessDecoder(decoder_dir)


@pytest.fixture(scope="session")
def service(default_bundle: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    """autoglm-server on the embedded default, with its default settings."""
    server = start_server(tmp_path_factory.mktemp("bench-service"), None, timeout=600)
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def transformers_serve(decoder_dir: Path, tmp_path_factory) -> Iterator[OpenAIServer]:
    server = start_transformers_serve(decoder_dir, tmp_path_factory.mktemp("tf-serve"),
                                      continuous_batching=False)
    yield server
    server.terminate()


@pytest.fixture(scope="session")
def transformers_serve_cb(decoder_dir: Path, tmp_path_factory) -> Iterator[OpenAIServer]:
    server = start_transformers_serve(decoder_dir, tmp_path_factory.mktemp("tf-serve-cb"),
                                      continuous_batching=True)
    yield server
    server.terminate()
