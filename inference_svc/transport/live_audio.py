"""GenerateLive's input: `start`, audio chunks and `end`, read from the client's stream
under the service's bounds. The request is submitted at `start` (its last user message
ends with the live audio); each chunk goes to the engine's LiveAudio as it comes, which
the model thread encodes and prefills chunk by chunk, and `end` seals it. The reply
streams as Generate's does (inference_servicer).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

import numpy as np

from autoglm.inference.v1 import inference_service_pb2 as pb
from inference_svc.config import ServerConfig
from inference_svc.errors import DeadlineExceeded, InvalidMedia, InvalidRequest, ServiceError
from inference_svc.model.inputs.live_audio import LiveAudio
from inference_svc.model.inputs.media import decode_pcm
from inference_svc.transport.convert import live_start_from_pb
from inference_svc.types import AudioPart, ChatMessage, GenerationRequest, SamplingParams

SAMPLE_RATE_HZ = 16_000  # the audio encoder's rate; the contract asks for it
SAMPLE_WIDTHS = {"s16le": 2, "f32le": 4}
SILENCE_FRAME = SAMPLE_RATE_HZ // 50  # 20 ms
SILENCE_RMS = 10 ** (-40 / 20)  # -40 dBFS


@dataclass(frozen=True, slots=True)
class LiveLimits:
    """The bounds of one GenerateLive stream (the --live-audio-* settings)."""

    max_utterance_s: float
    min_chunk_ms: int
    max_chunk_ms: int
    idle_timeout_s: float

    @classmethod
    def of(cls, config: ServerConfig) -> LiveLimits:
        return cls(config.live_audio_max_utterance_s, config.live_audio_min_chunk_ms,
                   config.live_audio_max_chunk_ms, config.live_audio_idle_timeout_s)


class Utterance:
    """The chunks of one stream, each checked against the bounds before it is taken."""

    def __init__(self, encoding: str, limits: LiveLimits, *, room_samples: int) -> None:
        self.encoding = encoding
        self.limits = limits
        self.room_samples = room_samples  # what the model's context has room for
        self.num_chunks = 0
        self.num_samples = 0
        self._width = SAMPLE_WIDTHS[encoding]
        self._short_chunk: int | None = None  # a chunk under the minimum: it must be the last

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE_HZ

    def add(self, data: bytes) -> np.ndarray:
        """One chunk's samples (float32). Every bound is checked before it is taken."""
        index, limits = self.num_chunks, self.limits
        if self._short_chunk is not None:
            raise InvalidMedia(
                f"audio.data: chunk {self._short_chunk} was shorter than "
                f"{limits.min_chunk_ms} ms and not the last before end",
                field="audio.data")
        if len(data) % self._width:
            raise InvalidMedia(
                f"audio.data: chunk {index} has {len(data)} bytes, not a whole number of "
                f"{self.encoding} samples ({self._width} bytes each)", field="audio.data")
        samples = len(data) // self._width
        millis = samples * 1000 / SAMPLE_RATE_HZ
        if not samples:
            raise InvalidMedia(f"audio.data: chunk {index} is empty", field="audio.data")
        if millis > limits.max_chunk_ms:
            raise InvalidMedia(
                f"audio.data: chunk {index} is {millis:g} ms, longer than "
                f"{limits.max_chunk_ms} ms (--live-audio-max-chunk-ms)", field="audio.data")
        total = self.num_samples + samples
        if total / SAMPLE_RATE_HZ > limits.max_utterance_s:
            raise InvalidRequest(
                f"audio: the utterance passes {limits.max_utterance_s:g} s at chunk {index} "
                "(--live-audio-max-utterance)", field="audio")
        if total > self.room_samples:
            raise InvalidRequest(
                f"audio: the utterance passes {self.room_samples / SAMPLE_RATE_HZ:g} s at "
                f"chunk {index}, all the model's context leaves it after the conversation",
                field="audio")
        decoded = decode_pcm(data, sample_rate=SAMPLE_RATE_HZ, encoding=self.encoding,
                             channels=1, field="audio.data", target_rate=SAMPLE_RATE_HZ)
        if millis < limits.min_chunk_ms:
            self._short_chunk = index
        self.num_chunks += 1
        self.num_samples = total
        return decoded.samples


class SilenceWatch:
    """Whether the speech has been followed by `ms` of silence: 20 ms frames quieter than
    -40 dBFS (SILENCE_RMS) after at least one louder frame."""

    def __init__(self, ms: int) -> None:
        self.needed = ms * SAMPLE_RATE_HZ // 1000
        self.heard = False  # speech so far
        self.quiet = 0  # silent samples since the last loud frame
        self._rest = np.zeros(0, np.float32)  # samples short of a whole frame

    def ended(self, samples: np.ndarray) -> bool:
        audio = np.concatenate([self._rest, samples])
        whole = len(audio) // SILENCE_FRAME * SILENCE_FRAME
        self._rest = audio[whole:]
        frames = audio[:whole].reshape(-1, SILENCE_FRAME)
        loud = np.flatnonzero(np.sqrt((frames ** 2).mean(axis=1)) >= SILENCE_RMS)
        if len(loud):
            self.heard = True
            self.quiet = (len(frames) - 1 - loud[-1]) * SILENCE_FRAME
        else:
            self.quiet += whole
        return self.heard and self.quiet >= self.needed


def with_user_audio(request: GenerationRequest, audio: AudioPart) -> GenerationRequest:
    """The request with `audio` as the last part of its last message when that message is
    the user's, else as a new user message after it."""
    messages = list(request.messages)
    if messages and messages[-1].role == "user":
        last = messages.pop()
        messages.append(ChatMessage("user", [*last.parts, audio]))
    else:
        messages.append(ChatMessage("user", [audio]))
    return replace(request, messages=messages)


class LiveInput:
    """The client's half of one GenerateLive stream: `start` first, then the audio, read
    in the background into the engine's LiveAudio while the reply streams."""

    def __init__(self, requests: AsyncIterator[pb.GenerateLiveRequest], limits: LiveLimits,
                 *, on_audio: Callable[[float], None] = lambda seconds: None) -> None:
        self._requests = aiter(requests)
        self._limits = limits
        self._on_audio = on_audio
        self._count = 0  # messages read
        self.encoding = ""
        self.silence: SilenceWatch | None = None  # the client asked for an end on silence
        self.utterance: Utterance | None = None
        self.audio: LiveAudio | None = None
        self.ended_at: float | None = None  # when `end` came (or the silence that ended it)
        self.ended_on_silence = False
        self.broken: ServiceError | None = None  # why the input failed, once it has
        self._feeding: asyncio.Task[None] | None = None

    @property
    def seconds(self) -> float:
        return self.utterance.seconds if self.utterance is not None else 0.0

    async def start(self, *, request_id: str, defaults: SamplingParams,
                    deadline: float | None) -> GenerationRequest:
        """Read `start`: the request to submit, its last user message ending with the
        live audio."""
        first = await self._next()
        if first is None or first.WhichOneof("message") != "start":
            raise InvalidRequest("start: the first message must be start", field="start")
        request, self.encoding = live_start_from_pb(
            first.start, sample_rate_hz=SAMPLE_RATE_HZ, request_id=request_id,
            defaults=defaults, deadline=deadline)
        if first.start.end_on_silence_ms:
            self.silence = SilenceWatch(first.start.end_on_silence_ms)
        return with_user_audio(request, AudioPart("audio", live=True))

    def feed(self, audio: LiveAudio, cancel: Callable[[], None]) -> None:
        """Read the rest of the stream in the background: chunks go to `audio`, `end`
        seals it, and a message after `end` breaks the stream. What breaks it is kept
        (`check` raises it) and `cancel` stops the request."""
        self.audio = audio
        self.utterance = Utterance(self.encoding, self._limits, room_samples=audio.max_samples)

        async def feeding() -> None:
            try:
                await self._read_audio(audio)
                await self._watch_after_end()
            except ServiceError as error:
                self.broken = error
                cancel()
                audio.on_input()  # the model loop may be waiting for this audio: wake it

        self._feeding = asyncio.ensure_future(feeding())

    async def _read_audio(self, audio: LiveAudio) -> None:
        utterance = self.utterance
        while True:
            message = await self._next()
            kind = message.WhichOneof("message") if message is not None else None
            if kind == "audio":
                samples = utterance.add(message.audio.data)
                audio.append(samples)
                self._on_audio(len(samples) / SAMPLE_RATE_HZ)
                if self.silence is not None and self.silence.ended(samples):
                    self.ended_on_silence = True
                    self.ended_at = time.monotonic()
                    audio.seal()
                    return
            elif kind == "end":
                if not utterance.num_samples:
                    raise InvalidRequest("audio: end came before any audio chunk", field="audio")
                self.ended_at = time.monotonic()
                audio.seal()
                return
            elif kind == "start":
                raise InvalidRequest(f"start: message {self._count - 1} is a second start",
                                     field="start")
            elif message is None:
                # grpc reads a cancelled call's stream as ended too; then this status
                # reaches nobody, though the log line names it
                raise InvalidRequest("end: the client closed its stream before end",
                                     field="end")
            else:
                raise InvalidRequest(f"message {self._count - 1} is empty: set start, audio "
                                     "or end", field="message")

    async def _watch_after_end(self) -> None:
        """Any message after `end` breaks the stream; the client closing its side is fine.
        After an end on silence the client, not knowing, may go on: its audio is dropped
        and its own `end` taken."""
        on_silence = self.ended_on_silence
        async for message in self._requests:
            self._count += 1
            kind = message.WhichOneof("message") or "message"
            if on_silence and kind == "audio":
                continue
            if on_silence and kind == "end":
                on_silence = False
                continue
            raise InvalidRequest(f"{kind}: message {self._count - 1} follows end", field=kind)

    def check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def close(self) -> None:
        """The call is over (ended, failed, or the client went away): drop the audio."""
        if self._feeding is not None:
            self._feeding.cancel()
        if self.audio is not None:
            self.audio.close()

    async def _next(self) -> pb.GenerateLiveRequest | None:
        async def next_message() -> pb.GenerateLiveRequest | None:
            return await anext(self._requests, None)

        try:
            message = await asyncio.wait_for(next_message(), self._limits.idle_timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"no message for {self._limits.idle_timeout_s:g} s before end "
                "(--live-audio-idle-timeout)") from None
        self._count += 1
        return message
