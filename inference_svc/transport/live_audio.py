"""GenerateLive's input: `start`, audio chunks and `end`, read from the client's stream
under the service's bounds and turned into one GenerationRequest whose last user message
ends with the utterance. What follows `end` runs as Generate does (inference_servicer).

The audio is buffered whole and encoded at `end` by the one-shot encoder; encoding
chunks as they arrive is the next step (issue 25).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace

from autoglm.inference.v1 import inference_service_pb2 as pb
from inference_svc.config import ServerConfig
from inference_svc.errors import DeadlineExceeded, InvalidMedia, InvalidRequest, ServiceError
from inference_svc.transport.convert import live_start_from_pb
from inference_svc.types import AudioPart, ChatMessage, GenerationRequest, SamplingParams

SAMPLE_RATE_HZ = 16_000  # the audio encoder's rate; the contract asks for it
SAMPLE_WIDTHS = {"s16le": 2, "f32le": 4}


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
    """The audio of one stream, checked chunk by chunk and kept until `end`."""

    def __init__(self, encoding: str, limits: LiveLimits) -> None:
        self.encoding = encoding
        self.limits = limits
        self.num_chunks = 0
        self.num_samples = 0
        self._width = SAMPLE_WIDTHS[encoding]
        self._pcm = bytearray()
        self._short_chunk: int | None = None  # a chunk under the minimum: it must be the last

    @property
    def seconds(self) -> float:
        return self.num_samples / SAMPLE_RATE_HZ

    def add(self, data: bytes) -> float:
        """Keep one chunk; return its seconds. Every bound is checked before it is kept."""
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
        if (self.num_samples + samples) / SAMPLE_RATE_HZ > limits.max_utterance_s:
            raise InvalidRequest(
                f"audio: the utterance passes {limits.max_utterance_s:g} s at chunk {index} "
                "(--live-audio-max-utterance)", field="audio")
        if millis < limits.min_chunk_ms:
            self._short_chunk = index
        self._pcm += data
        self.num_chunks += 1
        self.num_samples += samples
        return samples / SAMPLE_RATE_HZ

    def part(self) -> AudioPart:
        if not self.num_samples:
            raise InvalidRequest("audio: end came before any audio chunk", field="audio")
        return AudioPart("audio", pcm=bytes(self._pcm), sample_rate=SAMPLE_RATE_HZ,
                         encoding=self.encoding, channels=1)

    def clear(self) -> None:
        self._pcm = bytearray()


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
    """The client's half of one GenerateLive stream."""

    def __init__(self, requests: AsyncIterator[pb.GenerateLiveRequest], limits: LiveLimits,
                 *, on_audio: Callable[[float], None] = lambda seconds: None) -> None:
        self._requests = aiter(requests)
        self._limits = limits
        self._on_audio = on_audio
        self._count = 0  # messages read
        self.utterance: Utterance | None = None
        self.broken: ServiceError | None = None  # set when a message follows `end`
        self._watch: asyncio.Task[None] | None = None

    @property
    def seconds(self) -> float:
        return self.utterance.seconds if self.utterance is not None else 0.0

    async def read(self, *, request_id: str, defaults: SamplingParams,
                   deadline: float | None) -> GenerationRequest:
        """Read `start`, the audio and `end`; return the request to run."""
        first = await self._next()
        if first is None or first.WhichOneof("message") != "start":
            raise InvalidRequest("start: the first message must be start", field="start")
        request, encoding = live_start_from_pb(first.start, sample_rate_hz=SAMPLE_RATE_HZ,
                                               request_id=request_id, defaults=defaults,
                                               deadline=deadline)
        self.utterance = utterance = Utterance(encoding, self._limits)
        while True:
            message = await self._next()
            kind = message.WhichOneof("message") if message is not None else None
            if kind == "audio":
                self._on_audio(utterance.add(message.audio.data))
            elif kind == "end":
                part = utterance.part()
                utterance.clear()
                return with_user_audio(request, part)
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

    def watch_after_end(self, cancel: Callable[[], None]) -> None:
        """Read on after `end`: any message there breaks the stream and calls `cancel`;
        the client closing its side is fine."""

        async def watch() -> None:
            try:
                message = await anext(self._requests, None)
            except ServiceError as error:  # an undecodable message
                self.broken = error
            else:
                if message is None:
                    return
                kind = message.WhichOneof("message") or "message"
                self.broken = InvalidRequest(f"{kind}: message {self._count} follows end",
                                             field=kind)
            cancel()

        self._watch = asyncio.ensure_future(watch())

    def check(self) -> None:
        if self.broken is not None:
            raise self.broken

    def close(self) -> None:
        if self.utterance is not None:
            self.utterance.clear()
        if self._watch is not None:
            self._watch.cancel()

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

