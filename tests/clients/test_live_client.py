"""The clients' GenerateLive (sync and asyncio) and the WAV chunk helpers, against the
real server on a tiny random model (the shared `inference_server` fixture)."""

from __future__ import annotations

import asyncio
import io
import wave

import pytest
from autoglm_client import (
    AsyncInferenceClient,
    InferenceClient,
    InputError,
    InvalidArgumentError,
    ReasoningDelta,
    Sampling,
    TextDelta,
    pcm_audio,
    user,
    wav_chunks,
    wav_chunks_async,
)
from autoglm_client.live import SpeechEndTimer, wav_pcm

from tests.conftest import wav_bytes

GREEDY = Sampling(max_new_tokens=8, min_new_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def client(inference_server):
    with InferenceClient(inference_server.target, timeout=120) as sync_client:
        yield sync_client


def stereo_wav() -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\0\0" * 2 * 1600)
    return buffer.getvalue()


def test_wav_chunks_cut_the_samples_in_order():
    clip = wav_bytes(0.25)
    chunks = list(wav_chunks(clip, chunk_ms=100))
    assert [len(c) for c in chunks] == [3200, 3200, 1600]
    assert b"".join(chunks) == wav_pcm(clip)


def test_wav_chunks_refuse_what_the_service_does_not_take_before_sending():
    with pytest.raises(InputError, match="16 kHz mono 16-bit"):
        wav_chunks(stereo_wav())
    with pytest.raises(InputError, match="16 kHz mono 16-bit"):
        wav_chunks(wav_bytes(0.1, rate=8000))
    with pytest.raises(InputError, match="not a readable PCM WAV"):
        wav_chunks(b"RIFF0000WAVEjunk")


def test_speech_end_timer_counts_from_the_last_chunk_to_the_first_token():
    ticks = iter([2.0, 2.5, 9.0])
    timer = SpeechEndTimer(clock=lambda: next(ticks))
    assert list(timer.chunks([b"a", b"b"])) == [b"a", b"b"]  # the end of audio at 2.0
    assert timer.first_token_after_s is None
    timer.observe(ReasoningDelta("hm"))  # 2.5
    timer.observe(TextDelta("ok"))
    assert timer.first_token_after_s == 0.5


def test_generate_live_answers_as_generate_with_the_whole_clip(client, tmp_path):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav_bytes(0.5))
    live = client.generate_live("Listen.", wav_chunks(clip, chunk_ms=100), GREEDY)
    whole = client.generate(user("Listen.", pcm_audio(wav_pcm(clip), 16000)), GREEDY)
    assert live.text == whole.text
    assert live.usage.audio_tokens == whole.usage.audio_tokens > 0
    assert live.usage.prompt_tokens == whole.usage.prompt_tokens
    assert live.usage.audio_seconds == pytest.approx(0.5)


def test_stream_live_yields_the_events_of_stream(client):
    events = list(client.stream_live("Listen.", wav_chunks(wav_bytes(0.3)), GREEDY))
    assert events[-1].usage.audio_seconds == pytest.approx(0.3)


def test_a_chunk_the_service_refuses_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError, match="longer than 500 ms"):
        client.generate_live("Listen.", [wav_pcm(wav_bytes(0.6))], GREEDY)


def test_async_generate_live_paced_in_real_time(inference_server, client):
    clip = wav_bytes(0.3)
    whole = client.generate(user("Listen.", pcm_audio(wav_pcm(clip), 16000)), GREEDY)

    async def run():
        async with AsyncInferenceClient(inference_server.target, timeout=120) as aio:
            paced = await aio.generate_live(
                "Listen.", wav_chunks_async(clip, chunk_ms=100, realtime=True), GREEDY)
            plain = await aio.generate_live("Listen.", wav_chunks(clip), GREEDY)
            return paced, plain

    paced, plain = asyncio.run(run())
    assert paced.text == plain.text == whole.text
    assert paced.usage.audio_seconds == pytest.approx(0.3)
