"""An utterance still being spoken: its samples as they arrive (from the transport's
thread) and the embeddings of its chunks as the model thread encodes them.

Only whole chunks (model/audio_chunks.py) are offered while the speech goes on; once it
is sealed the last, partial chunk is too. Closing drops every sample and embedding.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

from inference_svc.model.audio_chunks import AudioChunking


def _ignore(*args: object) -> None:
    pass


class LiveAudio:
    def __init__(self, chunking: AudioChunking, *, digest: bytes) -> None:
        self.chunking = chunking
        self.digest = digest  # its positions' content ids derive from it: unique per stream
        self._lock = threading.Lock()
        self._pcm = bytearray()  # float32 samples
        self._sealed = False
        self._embeds: list[torch.Tensor] = []  # one [tokens, hidden] per encoded chunk
        self._encoded = 0  # tokens encoded
        self._closed = False
        self.max_samples = sys.maxsize  # what the prompt has room for (the engine sets it)
        self.on_input: Callable[[], None] = _ignore  # more to prefill (the engine's wake-up)
        self.on_encoded: Callable[[float], None] = _ignore  # seconds per chunk (metrics)

    def append(self, samples: np.ndarray) -> None:
        with self._lock:
            if self._sealed:
                raise RuntimeError("audio appended to a sealed utterance")
            before = len(self._pcm) // 4 // self.chunking.chunk_samples
            self._pcm += samples.astype(np.float32, copy=False).tobytes()
            whole_chunk = len(self._pcm) // 4 // self.chunking.chunk_samples > before
        if whole_chunk:
            self.on_input()

    def seal(self) -> None:
        with self._lock:
            self._sealed = True
        self.on_input()

    def close(self) -> None:
        """Drop the audio and its embeddings (the stream ended or went away)."""
        with self._lock:
            self._closed = True
            self._pcm = bytearray()
            self._embeds = []
        self.on_input()

    def ready(self) -> tuple[int, bool]:
        """Tokens that can be prefilled now, and whether the utterance is complete."""
        with self._lock:
            samples, sealed = len(self._pcm) // 4, self._sealed
        chunking = self.chunking
        if sealed:
            return chunking.tokens(samples), True
        return samples // chunking.chunk_samples * chunking.chunk_tokens, False

    def embeddings(self, encoder, tokens: int) -> torch.Tensor:
        """The first `tokens` embeddings [tokens, hidden], encoding the chunks not yet
        encoded (model thread; `encoder` is the loaded AudioEncoder)."""
        chunking = self.chunking
        pending = [span for span in chunking.spans(tokens) if span[0] >= self._encoded]
        if pending:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the live audio stream has ended")
                samples = np.frombuffer(bytes(self._pcm), dtype=np.float32)
            for first, count in pending:  # one at a time, as streamed
                started = time.perf_counter()
                self._embeds.append(encoder.encode_chunks(samples, [(first, count)]))
                self._encoded = first + count
                self.on_encoded(time.perf_counter() - started)
        return torch.cat(self._embeds)[:tokens]
