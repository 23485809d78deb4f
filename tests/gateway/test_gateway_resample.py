"""The Realtime endpoint's 24 kHz -> 16 kHz resampler: speech frequencies pass unchanged,
what would alias is removed, and audio fed in pieces comes out as the whole clip does."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.resample import Resampler, resample

RATE_IN, RATE_OUT = 24_000, 16_000
AMPLITUDE = 0.5 * 32767


def tone(frequency: float, seconds: float = 1.0, rate: int = RATE_IN) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * frequency * t) * AMPLITUDE).astype("<i2").tobytes()


def samples(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def gain_db(frequency: float) -> float:
    out = samples(resample(tone(frequency), RATE_IN, RATE_OUT))[400:-400]  # edges padded
    return 20 * np.log10(np.sqrt(np.mean(out**2)) / (AMPLITUDE / np.sqrt(2)))


@pytest.mark.parametrize("frequency", [100, 440, 1000, 3000, 6000])
def test_speech_band_passes_unchanged(frequency):
    assert abs(gain_db(frequency)) < 0.05


def test_the_tone_is_the_same_tone_at_the_new_rate():
    out = samples(resample(tone(1000), RATE_IN, RATE_OUT))
    ideal = np.sin(2 * np.pi * 1000 * np.arange(RATE_OUT) / RATE_OUT) * AMPLITUDE
    assert len(out) == RATE_OUT
    assert np.max(np.abs(out - ideal)[100:-100]) < 2  # within rounding to 16 bits


@pytest.mark.parametrize("frequency", [9000, 10000, 11500])
def test_what_would_alias_below_8_khz_is_removed(frequency):
    assert gain_db(frequency) < -60


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pieces_of_any_size_give_the_whole_clips_samples(seed):
    pcm = tone(440, 0.7) + tone(2500, 0.3)
    rng = np.random.default_rng(seed)
    resampler, out, at = Resampler(RATE_IN, RATE_OUT), b"", 0
    while at < len(pcm):
        size = 2 * int(rng.integers(1, 3000))  # one sample to 125 ms
        out += resampler.feed(pcm[at:at + size])
        at += size
    out += resampler.flush()
    assert out == resample(pcm, RATE_IN, RATE_OUT)


@pytest.mark.parametrize("num_samples", [1, 2, 3, 100, 24_001])
def test_the_output_covers_the_input_exactly(num_samples):
    out = resample(b"\x01\x00" * num_samples, RATE_IN, RATE_OUT)
    assert len(out) // 2 == -(-num_samples * RATE_OUT // RATE_IN)


def test_a_constant_stays_that_constant():
    out = samples(resample(np.full(4800, 1234, "<i2").tobytes(), RATE_IN, RATE_OUT))
    assert np.all(out[40:-40] == 1234)


def test_equal_rates_pass_the_samples_through():
    pcm = tone(440, 0.1, RATE_OUT)
    resampler = Resampler(RATE_OUT, RATE_OUT)
    assert resampler.feed(pcm) + resampler.flush() == pcm
