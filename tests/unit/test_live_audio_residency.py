"""An open live audio stream keeps the audio encoder in use: idle demotion passes it
over, and the memory account says why (engine.live_audio, memory/residency.py)."""

from __future__ import annotations

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.memory.residency import ResidencyPolicy
from tests.support.polling import wait_until


def test_idle_demotion_passes_over_the_audio_encoder_while_a_live_stream_is_open(model):
    assert "audio" in model.encoders
    engine = Engine(model, EngineConfig())
    policy = ResidencyPolicy(engine, idle_seconds=0.01)
    wait_until(lambda: "audio" in policy.idle_encoders(), 10, "the audio encoder idle")
    with engine.live_audio():
        assert "audio" in engine.modalities_in_use()
        assert "audio" not in policy.idle_encoders()
    assert "audio" not in engine.modalities_in_use()
    assert "audio" in policy.idle_encoders()
