"""The Realtime endpoint's speech detector on its own: frames at the threshold's level,
pieces of any size, and a turn that never falls silent."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.realtime_conversation import ServerVad
from gateway.realtime_vad import Boundary, SpeechDetector, threshold_dbfs

RATE = 16_000
LONGEST = 120 * RATE


def tone(seconds: float, dbfs: float = -10.0) -> bytes:
    t = np.arange(round(seconds * RATE)) / RATE
    peak = 10 ** (dbfs / 20) * np.sqrt(2) * 32767
    return (np.sin(2 * np.pi * 400 * t) * peak).astype("<i2").tobytes()


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


def at(ms: int) -> int:
    return ms * RATE // 1000


@pytest.mark.parametrize(("threshold", "dbfs"), [(0.0, -80), (0.25, -60), (0.5, -40),
                                                 (0.75, -20), (1.0, 0)])
def test_the_threshold_maps_linearly_onto_minus_80_to_0_dbfs(threshold, dbfs):
    assert threshold_dbfs(threshold) == pytest.approx(dbfs)


def test_pieces_of_any_size_find_what_the_whole_audio_does():
    audio = silence(0.33) + tone(0.25) + silence(0.17) + tone(0.1) + silence(0.61) + tone(0.05)
    whole = SpeechDetector(ServerVad(), max_turn_samples=LONGEST).feed(audio)
    detector = SpeechDetector(ServerVad(), max_turn_samples=LONGEST)
    pieces: list[Boundary] = []
    for start in range(0, len(audio), 2 * 157):
        pieces += detector.feed(audio[start:start + 2 * 157])

    # 20 ms frames: speech from the frame it enters, until 500 ms after the frame it left
    assert pieces == whole == [Boundary("started", at(320)), Boundary("stopped", at(1360)),
                               Boundary("started", at(1460))]


def test_a_level_just_under_the_threshold_is_silence():
    detector = SpeechDetector(ServerVad(threshold=0.5), max_turn_samples=LONGEST)
    assert detector.feed(tone(0.5, dbfs=-41) + silence(0.6)) == []
    assert detector.feed(tone(0.1, dbfs=-39)) == [Boundary("started", at(1100))]


def test_a_turn_that_never_falls_silent_stops_at_the_longest_audio_it_may_hold():
    detector = SpeechDetector(ServerVad(), max_turn_samples=at(1000), position=at(200))
    assert detector.feed(tone(2.5)) == [
        Boundary("started", at(200)), Boundary("stopped", at(1200)),
        Boundary("started", at(1200)), Boundary("stopped", at(2200)),
        Boundary("started", at(2200))]
