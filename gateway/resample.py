"""Streaming resampling of 16-bit PCM: OpenAI's Realtime `pcm16` is 24 kHz, the service
takes live audio at 16 kHz.

Each output sample is the input weighted by a Kaiser-windowed sinc low-pass (cut at 95 %
of the lower rate's Nyquist frequency) centred on the output instant; weights are
normalised per output so that a constant stays exactly constant. The resampler keeps the
few input samples the next outputs still need, so audio fed in pieces of any size comes
out exactly as the whole clip would; `flush` pads the end with silence.
"""

from __future__ import annotations

from math import gcd

import numpy as np

_HALF_WIDTH = 32  # input samples each side of an output instant (1.3 ms at 24 kHz)
_KAISER_BETA = 8.0  # about 80 dB of stop-band attenuation
_PASS_FRACTION = 0.95  # of the lower rate's Nyquist frequency
_BLOCK = 4096  # output samples computed at once


class Resampler:
    """Converts s16le mono PCM from `rate_in` to `rate_out`, piece by piece (equal rates:
    the samples as they came)."""

    def __init__(self, rate_in: int, rate_out: int) -> None:
        if rate_in <= 0 or rate_out <= 0:
            raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
        divisor = gcd(rate_in, rate_out)
        self._up, self._down = rate_out // divisor, rate_in // divisor
        self._weights = _phase_weights(self._up, min(rate_in, rate_out) / rate_in)
        self._offsets = np.arange(2 * _HALF_WIDTH)
        # silence before the first sample, so the first outputs see a full window
        self._pending = np.zeros(_HALF_WIDTH)
        self._base = -_HALF_WIDTH  # input index of _pending[0]
        self._next = 0  # index of the next output sample
        self._received = 0  # input samples fed

    def feed(self, pcm: bytes) -> bytes:
        """The output samples that `pcm` (whole s16le samples) completes."""
        if self._up == self._down:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        self._pending = np.concatenate([self._pending, samples])
        self._received += len(samples)
        last_usable = self._base + len(self._pending) - 1 - _HALF_WIDTH
        return self._emit(_outputs_up_to(last_usable, self._up, self._down))

    def flush(self) -> bytes:
        """The remaining output samples, the input's end padded with silence; the
        resampler is done after this."""
        if self._up == self._down:
            return b""
        self._pending = np.concatenate([self._pending, np.zeros(_HALF_WIDTH)])
        # every output whose instant lies inside the input
        return self._emit(-(-self._received * self._up // self._down))

    def _emit(self, end: int) -> bytes:
        # in blocks, so that a long clip fed at once needs little memory
        pieces = []
        while self._next < end:
            pieces.append(self._emit_block(min(end, self._next + _BLOCK)))
        return b"".join(pieces)

    def _emit_block(self, end: int) -> bytes:
        numerators = np.arange(self._next, end) * self._down
        centres, phases = numerators // self._up, numerators % self._up
        first = centres - _HALF_WIDTH + 1 - self._base
        window = self._pending[first[:, None] + self._offsets]
        out = np.einsum("ij,ij->i", window, self._weights[phases])
        self._next = end
        keep_from = (end * self._down) // self._up - _HALF_WIDTH + 1 - self._base
        self._pending = self._pending[keep_from:]
        self._base += keep_from
        return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()


def _outputs_up_to(last_input: int, up: int, down: int) -> int:
    """How many outputs have their window's last input at or before `last_input`:
    output n needs inputs up to floor(n * down / up) + half width."""
    if last_input < 0:
        return 0
    return -(-(last_input + 1) * up // down)


def _phase_weights(up: int, cutoff_ratio: float) -> np.ndarray:
    """Normalised filter taps for each of the `up` fractional positions an output instant
    can have between two input samples; row p is for position p / up."""
    cutoff = _PASS_FRACTION * cutoff_ratio / 2  # cycles per input sample
    fractions = np.arange(up)[:, None] / up
    # distance from the output instant to each of the 2 * half width inputs around it
    distances = fractions + (_HALF_WIDTH - 1) - np.arange(2 * _HALF_WIDTH)[None, :]
    taper = np.clip(1 - (distances / _HALF_WIDTH) ** 2, 0, None)
    weights = np.sinc(2 * cutoff * distances) * np.i0(_KAISER_BETA * np.sqrt(taper))
    return weights / weights.sum(axis=1, keepdims=True)


def resample(pcm: bytes, rate_in: int, rate_out: int) -> bytes:
    """A whole clip at `rate_out`."""
    resampler = Resampler(rate_in, rate_out)
    return resampler.feed(pcm) + resampler.flush()
