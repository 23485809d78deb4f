"""The chunked audio encoder: a clip cut into chunks with left context encodes the same
whole and streamed, and a chunk reads nothing of the audio after it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ConformerConfig, Wav2Vec2ConformerModel

from inference_svc.model.audio_chunks import AudioChunking, ChunkSettings
from inference_svc.model.encoders import AudioEncoder
from inference_svc.model.inputs.live_audio import LiveAudio
from inference_svc.model.inputs.media import DecodedAudio

RATE = 16_000
WAV2VEC2_CONV = [(10, 5)] + [(3, 2)] * 4 + [(2, 2)] * 2  # 20 ms frames, 25 ms field


@pytest.fixture(scope="module")
def encoder() -> AudioEncoder:
    torch.manual_seed(0)
    config = Wav2Vec2ConformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_depthwise_kernel_size=7, conv_dim=(16,) * 7, num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2, position_embeddings_type="relative")
    return AudioEncoder(Wav2Vec2ConformerModel(config), 24).eval()


def speech(seconds: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 0.1).astype(np.float32)


def test_a_chunk_is_its_samples_after_its_left_context_and_before_the_lookahead():
    chunking = AudioChunking.of(WAV2VEC2_CONV, 4, ChunkSettings(chunk_tokens=8, left_tokens=8))
    assert (chunking.token_samples, chunking.chunk_samples, chunking.lookahead) == (
        1280, 10240, 80)
    clip = np.arange(1, 25_001, dtype=np.float32)  # 1.5625 s: 20 tokens, the last partial
    assert chunking.tokens(len(clip)) == 20
    assert chunking.spans(20) == [(0, 8), (8, 8), (16, 4)]
    first = chunking.window(clip, 0, 8)  # no audio before the clip: zeros
    assert len(first) == 10240 + 10240 + 80
    assert not first[:10240].any() and (first[10240:20480] == clip[:10240]).all()
    assert not first[20480:].any()
    second = chunking.window(clip, 8, 8)
    assert (second[:20480] == clip[:20480]).all()
    last = chunking.window(clip, 16, 4)  # the clip ends inside it: zeros after
    assert len(last) == 10240 + 4 * 1280 + 80
    assert (last[:10240 + 4520] == clip[10240:]).all() and not last[10240 + 4520:].any()


def test_a_chunk_reads_no_audio_after_it(encoder):
    clip = speech(2.0)
    later = np.concatenate([clip[:RATE], speech(1.0, seed=9)])  # same first second
    a, b = encoder.encode([DecodedAudio(clip, RATE), DecodedAudio(later, RATE)])
    chunk = encoder.chunking.chunk_tokens
    whole_chunks = RATE // encoder.chunking.chunk_samples  # chunks wholly in the first second
    torch.testing.assert_close(a[:whole_chunks * chunk], b[:whole_chunks * chunk])
    assert not torch.allclose(a[-chunk:], b[-chunk:])


def test_streamed_in_100_ms_pieces_it_encodes_as_sent_whole(encoder):
    clip = speech(2.3)
    whole = encoder.encode([DecodedAudio(clip, RATE)])[0]
    live = LiveAudio(encoder.chunking, digest=b"x")
    woken = []
    live.on_input = lambda: woken.append(live.ready())
    piece, offered = RATE // 10, []
    for at in range(0, len(clip), piece):
        live.append(clip[at:at + piece])
        tokens, sealed = live.ready()
        assert not sealed and tokens % encoder.chunking.chunk_tokens == 0  # whole chunks only
        if tokens and tokens not in offered:
            offered.append(tokens)
            live.embeddings(encoder, tokens)  # encoded as it arrives
    assert offered == [8, 16, 24]
    live.seal()
    tokens, sealed = live.ready()
    assert sealed and tokens == whole.shape[0] == 29
    streamed = live.embeddings(encoder, tokens)
    difference = (streamed - whole).abs().max().item()
    assert difference < 1e-5, difference
    assert woken[-1] == (29, True)  # a wake-up for each whole chunk and for the end
    assert [t for t, _ in woken[:-1]] == [8, 16, 24]


def test_closed_audio_keeps_nothing(encoder):
    live = LiveAudio(encoder.chunking, digest=b"x")
    live.append(speech(1.0))
    live.embeddings(encoder, 8)
    live.close()
    with pytest.raises(RuntimeError, match="ended"):
        live.embeddings(encoder, 16)
