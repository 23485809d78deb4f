"""Server-side turn detection (OpenAI's `server_vad`): where speech starts and stops in
the 16 kHz audio a Realtime session forwards, judged by its energy.

The audio is cut into 20 ms frames; a frame is speech when its RMS level reaches the
session's `threshold` (0 to 1) mapped linearly onto -80 to 0 dBFS: the default 0.5 is
-40 dBFS, the level the service's own silence watch takes as quiet; 0.75 is -20 dBFS;
0 takes anything above -80 dBFS (but digital silence) as speech, 1 only full-scale audio.
Speech starts at the first speech frame and stops once `silence_duration_ms` of frames
after the last speech frame have all been quiet (or when a turn reaches the longest audio
the service takes). Silence before speech neither starts nor ends anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .realtime_conversation import SERVICE_RATE_HZ, ServerVad

FRAME_SAMPLES = SERVICE_RATE_HZ // 50  # 20 ms
_FULL_SCALE = 32768.0
_FLOOR_DBFS = -80.0


def threshold_dbfs(threshold: float) -> float:
    """The level (dBFS, RMS over a frame) at which a frame counts as speech."""
    return _FLOOR_DBFS * (1.0 - threshold)


@dataclass(frozen=True, slots=True)
class Boundary:
    """Where speech started (the first speech frame's first sample) or stopped (the end
    of the silence that ended it), as a sample index in the stream fed so far."""

    kind: Literal["started", "stopped"]
    at: int


class SpeechDetector:
    """Finds speech boundaries in 16 kHz s16le audio fed in pieces of any size."""

    def __init__(self, vad: ServerVad, *, max_turn_samples: int, position: int = 0) -> None:
        self._level = _FULL_SCALE * 10 ** (threshold_dbfs(vad.threshold) / 20)
        silence_samples = vad.silence_duration_ms * SERVICE_RATE_HZ // 1000
        self._silence_frames = max(1, -(-silence_samples // FRAME_SAMPLES))
        self._max_frames = max(1, max_turn_samples // FRAME_SAMPLES)
        self.position = position  # samples fed, including those short of a whole frame
        self._rest = np.zeros(0, np.float64)  # samples short of a whole frame
        self._speaking = False
        self._num_quiet = 0  # frames since the last speech frame
        self._num_frames = 0  # frames since the speech started

    def feed(self, pcm: bytes) -> list[Boundary]:
        """The boundaries that `pcm` (whole s16le samples) completes, in order."""
        first = self.position - len(self._rest)  # stream index of the first frame below
        audio = np.concatenate([self._rest, np.frombuffer(pcm, "<i2").astype(np.float64)])
        self.position += len(pcm) // 2
        whole = len(audio) // FRAME_SAMPLES * FRAME_SAMPLES
        self._rest = audio[whole:]
        frames = audio[:whole].reshape(-1, FRAME_SAMPLES)
        loud = np.sqrt((frames ** 2).mean(axis=1)) >= self._level
        boundaries: list[Boundary] = []
        for index, is_loud in enumerate(loud.tolist()):
            start = first + index * FRAME_SAMPLES
            if not self._speaking:
                if not is_loud:
                    continue
                self._speaking = True
                self._num_frames = 0
                boundaries.append(Boundary("started", start))
            self._num_frames += 1
            self._num_quiet = 0 if is_loud else self._num_quiet + 1
            if self._num_quiet >= self._silence_frames or self._num_frames >= self._max_frames:
                self.restart()
                boundaries.append(Boundary("stopped", start + FRAME_SAMPLES))
        return boundaries

    def restart(self) -> None:
        """Forget the speech in progress (its turn ended otherwise: a commit, a clear)."""
        self._speaking = False
        self._num_quiet = 0
