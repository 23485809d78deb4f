"""Live audio for GenerateLive: the request stream (`start`, audio chunks, `end`),
chunks read from a WAV file, paced in real time if asked, and the time from the end of
the speech to the reply's first token.

The service takes 16 kHz mono PCM (s16le or f32le) in chunks of 10-500 ms by default.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.content import BinarySource, _read
from autoglm_client.errors import InputError
from autoglm_client.results import ReasoningDelta, StreamEvent, TextDelta

SAMPLE_RATE_HZ = 16_000
BYTES_PER_SAMPLE = 2  # what the WAV helpers yield: s16le


def live_requests(start: pb.GenerateLiveStart,
                  chunks: Iterable[bytes]) -> Iterator[pb.GenerateLiveRequest]:
    """The messages of a GenerateLive call: `start`, one `audio` per chunk, `end`."""
    yield pb.GenerateLiveRequest(start=start)
    for chunk in chunks:
        yield pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=bytes(chunk)))
    yield pb.GenerateLiveRequest(end=pb.LiveAudioEnd())


async def live_requests_async(
    start: pb.GenerateLiveStart, chunks: Iterable[bytes] | AsyncIterable[bytes],
) -> AsyncIterator[pb.GenerateLiveRequest]:
    """`live_requests` from a sync or an async iterable of chunks."""
    yield pb.GenerateLiveRequest(start=start)
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=bytes(chunk)))
    else:
        for chunk in chunks:
            yield pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=bytes(chunk)))
    yield pb.GenerateLiveRequest(end=pb.LiveAudioEnd())


def wav_pcm(source: BinarySource) -> bytes:
    """The samples of a 16 kHz mono 16-bit PCM WAV file (path or bytes), as s16le."""
    data = _read(source, "audio")
    try:
        with wave.open(io.BytesIO(data)) as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as error:
        raise InputError(f"not a readable PCM WAV file: {error}") from error
    if (rate, channels, width) != (SAMPLE_RATE_HZ, 1, BYTES_PER_SAMPLE):
        raise InputError(
            f"live audio is 16 kHz mono 16-bit; this WAV is {rate} Hz, {channels} channel(s), "
            f"{8 * width}-bit (convert it: ffmpeg -i IN -ac 1 -ar 16000 -sample_fmt s16 OUT.wav)")
    return frames


def wav_chunks(source: BinarySource, chunk_ms: int = 100, *,
               realtime: bool = False) -> Iterator[bytes]:
    """Chunks of `chunk_ms` (the last may be shorter) of a 16 kHz mono 16-bit WAV file;
    with `realtime`, each chunk comes when its audio would have been spoken to its end, as
    from a microphone. The file is read and checked now (InputError), before any chunk is
    asked for."""
    pieces = _split(wav_pcm(source), chunk_ms)

    def paced() -> Iterator[bytes]:
        started, spoken = time.monotonic(), 0.0
        for piece in pieces:
            spoken += _seconds(piece)
            if realtime:
                time.sleep(max(0.0, started + spoken - time.monotonic()))
            yield piece

    return paced()


def wav_chunks_async(source: BinarySource, chunk_ms: int = 100, *,
                     realtime: bool = False) -> AsyncIterator[bytes]:
    """`wav_chunks` for asyncio: pacing sleeps without blocking the event loop."""
    pieces = _split(wav_pcm(source), chunk_ms)

    async def paced() -> AsyncIterator[bytes]:
        started, spoken = time.monotonic(), 0.0
        for piece in pieces:
            spoken += _seconds(piece)
            if realtime:
                await asyncio.sleep(max(0.0, started + spoken - time.monotonic()))
            yield piece

    return paced()


class SpeechEndTimer:
    """Times a live reply from the end of the speech (the moment the call has taken the
    last chunk and sends `end`) to its first token: the first delta, reasoning included."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._audio_ended_at: float | None = None
        self._first_token_at: float | None = None

    def chunks(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """`chunks` as they come, noting when the last one has been taken."""
        yield from chunks
        self._audio_ended_at = self._clock()

    def observe(self, event: StreamEvent) -> None:
        """Note the reply's first token when `event` carries it."""
        if self._first_token_at is None and isinstance(event, TextDelta | ReasoningDelta):
            self._first_token_at = self._clock()

    @property
    def first_token_after_s(self) -> float | None:
        """Seconds from the end of the speech to the first token; None if no text came."""
        if self._audio_ended_at is None or self._first_token_at is None:
            return None
        return self._first_token_at - self._audio_ended_at


def _split(pcm: bytes, chunk_ms: int) -> list[bytes]:
    if chunk_ms < 1:
        raise InputError(f"chunk_ms must be at least 1, not {chunk_ms}")
    size = SAMPLE_RATE_HZ * chunk_ms // 1000 * BYTES_PER_SAMPLE
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def _seconds(piece: bytes) -> float:
    return len(piece) / (BYTES_PER_SAMPLE * SAMPLE_RATE_HZ)
