"""A GenerateLive call fed while the user speaks, so that the service takes (and encodes)
the speech as it arrives and only the reply is left after the response is asked for.

The call opens with `basis`, the request a response would make for the conversation
before the speech; appended audio goes out in chunks of a fixed length (the service takes
10-500 ms by default; the last chunk may be shorter). Nothing here waits on the service:
messages queue up and grpc sends them. `finish` sends `end` and hands over the call, whose
replies are those of Generate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from autoglm.inference.v1 import inference_service_pb2 as pb

from .realtime_conversation import SERVICE_RATE_HZ
from .upstream import InferenceUpstream

_FORMAT = pb.LiveAudioFormat(sample_rate_hz=SERVICE_RATE_HZ, encoding=pb.PCM_ENCODING_S16LE)


class LiveUpload:
    def __init__(self, upstream: InferenceUpstream, basis: pb.GenerateRequest, *,
                 made_for: object, chunk_ms: int, request_id: str,
                 timeout: float | None) -> None:
        self.basis = basis
        self.made_for = made_for  # the caller's token of the state `basis` was made from
        self.request_id = request_id
        self.item_id: str | None = None  # the item its speech became, once committed
        self._chunk_bytes = SERVICE_RATE_HZ * chunk_ms // 1000 * 2
        self._unsent = bytearray()
        self._outbox: asyncio.Queue[pb.GenerateLiveRequest | None] = asyncio.Queue()
        self._outbox.put_nowait(pb.GenerateLiveRequest(
            start=pb.GenerateLiveStart(request=basis, format=_FORMAT)))
        self._finished = False
        self.call = upstream.generate_live(self._requests(), request_id=request_id,
                                           session_id=basis.session_id, timeout=timeout)

    def feed(self, pcm: bytes) -> None:
        """Send `pcm` (16 kHz s16le) in whole chunks; a partial chunk waits for more."""
        self._unsent += pcm
        whole = len(self._unsent) - len(self._unsent) % self._chunk_bytes
        for start in range(0, whole, self._chunk_bytes):
            self._send(bytes(self._unsent[start:start + self._chunk_bytes]))
        del self._unsent[:whole]

    def finish(self) -> grpc.aio.StreamStreamCall:
        """Send what is left and `end`: the reply begins. Returns the call to read."""
        if self._unsent:
            self._send(bytes(self._unsent))
            self._unsent.clear()
        self._outbox.put_nowait(pb.GenerateLiveRequest(end=pb.LiveAudioEnd()))
        self._outbox.put_nowait(None)  # then the request stream closes
        self._finished = True
        return self.call

    @property
    def usable(self) -> bool:
        """Still open and not yet finished."""
        return not self._finished and not self.call.done()

    async def expired(self) -> bool:
        """Ended by the service's idle timeout (nothing was said for a while): a new call
        with the speech sent again is as good."""
        return self.call.done() and await self.call.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def cancel(self) -> None:
        self.call.cancel()

    def _send(self, chunk: bytes) -> None:
        self._outbox.put_nowait(pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=chunk)))

    async def _requests(self) -> AsyncIterator[pb.GenerateLiveRequest]:
        while (message := await self._outbox.get()) is not None:
            yield message
