"""How the audio encoder cuts a clip so that it can be encoded while it is spoken.

A clip is encoded in fixed chunks of `chunk_tokens` audio tokens. Each chunk is encoded
from a window of its own samples with `left_tokens` tokens of audio before it (zeros
before the clip's start) and a few zero samples after it, which the feature encoder's
last frame needs. A chunk's embeddings so depend only on the past and the chunk itself:
attention, the Conformer's convolutions and the feature normalization see nothing later.
The left context is recomputed from the kept samples rather than cached per layer, so
the encoder stays the library's Wav2Vec2-Conformer, unchanged; a clip sent whole is cut
the same way, so whole and streamed give the same embeddings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

CHUNKING_FILE = "streaming.json"  # beside an audio encoder's checkpoint in a bundle


def conv_receptive_field(layers: list[tuple[int, int]]) -> int:
    """Fewest input samples from which an unpadded (kernel, stride) stack makes one frame."""
    field, jump = 1, 1
    for kernel, stride in layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


@dataclass(frozen=True)
class ChunkSettings:
    """What a bundle says of its audio encoder's streaming form (streaming.json)."""

    chunk_tokens: int = 8  # 640 ms at 80 ms a token
    left_tokens: int = 8  # 640 ms of left context

    @classmethod
    def read(cls, directory: Path) -> ChunkSettings:
        """The bundle's settings; these defaults for a bundle written before they existed."""
        path = directory / CHUNKING_FILE
        if not path.is_file():
            return cls()
        return cls(**json.loads(path.read_text()))

    def write(self, directory: Path) -> None:
        (directory / CHUNKING_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")


@dataclass(frozen=True)
class AudioChunking:
    """The geometry of an encoder's chunks, in samples."""

    token_samples: int  # samples per audio token (frame stride x frames merged)
    chunk_tokens: int
    left_tokens: int
    lookahead: int  # zero samples after a window: what its last frame reads past the end

    @classmethod
    def of(cls, conv: list[tuple[int, int]], merge: int, settings: ChunkSettings
           ) -> AudioChunking:
        stride = math.prod(s for _, s in conv)
        return cls(stride * merge, settings.chunk_tokens, settings.left_tokens,
                   conv_receptive_field(conv) - stride)

    @property
    def chunk_samples(self) -> int:
        return self.chunk_tokens * self.token_samples

    def tokens(self, num_samples: int) -> int:
        """Audio tokens a clip of `num_samples` becomes (a partial last token counts)."""
        return -(-num_samples // self.token_samples)

    def spans(self, tokens: int) -> list[tuple[int, int]]:
        """(first token, token count) of each chunk of a clip of `tokens` tokens."""
        return [(first, min(self.chunk_tokens, tokens - first))
                for first in range(0, tokens, self.chunk_tokens)]

    def window(self, samples: np.ndarray, first: int, count: int) -> np.ndarray:
        """The samples chunk (first, count) is encoded from: its left context, itself
        (zeros past the clip's end), and the lookahead zeros."""
        start = first * self.token_samples
        end = start + count * self.token_samples
        left = self.left_tokens * self.token_samples
        piece = samples[max(0, start - left):min(end, len(samples))]
        before = left - min(left, start)
        after = end - min(end, len(samples)) + self.lookahead
        return np.pad(piece.astype(np.float32, copy=False), (before, after))
