"""Loading hands back to the system the memory it freed (checkpoint buffers, quantizers'
temporaries), so that the process's resident size is what it holds."""

from __future__ import annotations

import pytest

from inference_svc.config import ServerConfig
from inference_svc.loading import load_model
from inference_svc.process_memory import release_freed_memory, rss_bytes


@pytest.mark.slow
def test_a_quantized_default_leaves_nothing_freed_resident_after_loading():
    model = load_model(ServerConfig(decoder_weights="int8"))
    assert model.decoder_unit.state().precision == "int8"
    loaded = rss_bytes()
    release_freed_memory()
    # glibc kept ~400 MiB of the int8 quantizer's freed temporaries before loading released
    assert loaded - rss_bytes() < 64 << 20
