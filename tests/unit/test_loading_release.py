"""Loading hands back to the system the memory it freed (checkpoint buffers, quantizers'
temporaries), so that the process's resident size is what it holds: at start-up and when
an offloaded module comes back."""

from __future__ import annotations

import pytest

from inference_svc.config import ServerConfig
from inference_svc.loading import load_model
from inference_svc.model.units import DISK
from inference_svc.process_memory import release_freed_memory, rss_bytes

# glibc kept ~300-400 MiB of the int8 quantizer's freed temporaries resident before
# loading released them
LEFT_TO_RELEASE = 64 << 20


def freed_but_resident() -> int:
    loaded = rss_bytes()
    release_freed_memory()
    return loaded - rss_bytes()


@pytest.mark.slow
def test_a_quantized_default_leaves_nothing_freed_resident_after_loading_or_reloading():
    model = load_model(ServerConfig(decoder_weights="int8"))
    unit = model.decoder_unit
    assert unit.state().precision == "int8"
    assert freed_but_resident() < LEFT_TO_RELEASE
    unit.move_to(DISK)
    unit.load()  # quantized again
    assert unit.state().precision == "int8"
    assert freed_but_resident() < LEFT_TO_RELEASE
