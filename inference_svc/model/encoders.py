"""Vision and audio encoders with the projectors that map them into the decoder's space.

Each encoder is a standard transformers model (ViT, Wav2Vec2-Conformer) saved as its own
checkpoint; the projector beside it is a small MLP saved as projector.safetensors.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    ViTImageProcessorPil,
    ViTModel,
    Wav2Vec2ConformerModel,
    Wav2Vec2FeatureExtractor,
)

from inference_svc.model.audio_chunks import AudioChunking, ChunkSettings
from inference_svc.model.inputs.media import DecodedAudio, DecodedImage
from inference_svc.model.vit_activations import IMAGE_MERGE

PROJECTOR_FILE = "projector.safetensors"
# Width of the projector's hidden layer: the reference model's 512-d encoder output.
PROJECTOR_WIDTH = 512
AUDIO_MERGE = 4  # 4 consecutive frames (80 ms) become one audio token
AUDIO_SAMPLE_RATE = 16_000
WINDOW_BATCH = 8  # audio chunk windows per encoder forward: bounds the activation peak

def _projector(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, PROJECTOR_WIDTH), nn.GELU(), nn.Linear(PROJECTOR_WIDTH, out_features)
    )


class VisionEncoder(nn.Module):
    """ViT patches, merged 2x2 and projected to decoder embeddings."""

    def __init__(self, vit: ViTModel, decoder_hidden: int) -> None:
        super().__init__()
        self.vit = vit
        config = vit.config
        self.grid = config.image_size // config.patch_size
        if self.grid % IMAGE_MERGE:
            raise ValueError(f"ViT grid {self.grid} is not divisible by {IMAGE_MERGE}")
        self.projector = _projector(config.hidden_size * IMAGE_MERGE**2, decoder_hidden)
        self.processor = ViTImageProcessorPil(
            size={"height": config.image_size, "width": config.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        )

    @property
    def architecture(self) -> str:
        return f"{type(self.vit).__name__}+projector"

    @property
    def tokens_per_image(self) -> int:
        return (self.grid // IMAGE_MERGE) ** 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.vit(pixel_values=pixel_values).last_hidden_state[:, 1:]  # drop CLS
        batch, _, hidden = patches.shape
        half = self.grid // IMAGE_MERGE
        grid = patches.reshape(batch, half, IMAGE_MERGE, half, IMAGE_MERGE, hidden)
        merged = grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, half * half, -1)
        return self.projector(merged)

    @torch.inference_mode()
    def encode(self, images: list[DecodedImage]) -> list[torch.Tensor]:
        param = next(self.parameters())
        pixels = self.processor([img.image for img in images], return_tensors="pt")["pixel_values"]
        out = self.forward(pixels.to(device=param.device, dtype=param.dtype))
        return list(out.unbind(0))

    def save(self, directory: Path) -> None:
        self.vit.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()},
                  str(directory / PROJECTOR_FILE))

    @classmethod
    def load(cls, directory: Path, decoder_hidden: int, dtype: torch.dtype) -> VisionEncoder:
        vit = ViTModel.from_pretrained(directory, add_pooling_layer=False, dtype=dtype)
        encoder = cls(vit, decoder_hidden)
        encoder.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
        return encoder.to(dtype).eval()


class AudioEncoder(nn.Module):
    """Conformer frames, merged 4 at a time and projected to decoder embeddings, encoded
    chunk by chunk with left context (model/audio_chunks.py) so that speech can be
    encoded while it is spoken; a whole clip is cut into the same chunks."""

    def __init__(self, conformer: Wav2Vec2ConformerModel, decoder_hidden: int,
                 settings: ChunkSettings | None = None) -> None:
        super().__init__()
        self.conformer = conformer
        self.projector = _projector(conformer.config.hidden_size * AUDIO_MERGE, decoder_hidden)
        self.settings = settings or ChunkSettings()
        config = conformer.config
        self.chunking = AudioChunking.of(
            list(zip(config.conv_kernel, config.conv_stride, strict=True)), AUDIO_MERGE,
            self.settings)
        self.features = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=AUDIO_SAMPLE_RATE, do_normalize=True,
            return_attention_mask=False,
        )

    @property
    def architecture(self) -> str:
        return f"{type(self.conformer).__name__}+projector (chunked)"

    def forward(self, windows: torch.Tensor, tokens: int) -> torch.Tensor:
        """[batch, window samples] -> the last `tokens` tokens of each window."""
        frames = self.conformer(input_values=windows).last_hidden_state
        batch, _, hidden = frames.shape
        frames = frames[:, -tokens * AUDIO_MERGE:]
        return self.projector(frames.reshape(batch, tokens, hidden * AUDIO_MERGE))

    @torch.inference_mode()
    def encode_chunks(self, samples: np.ndarray, spans: list[tuple[int, int]]) -> torch.Tensor:
        """The embeddings [tokens, hidden] of a clip's chunks (first token, token count),
        in order; chunks of one size are encoded WINDOW_BATCH windows at a time."""
        param = next(self.parameters())
        outputs = []
        for _, group in itertools.groupby(spans, key=lambda span: span[1]):
            group = list(group)
            for at in range(0, len(group), WINDOW_BATCH):
                batch = group[at:at + WINDOW_BATCH]
                windows = [self.chunking.window(samples, first, count) for first, count in batch]
                # normalized window by window: no statistics from later audio
                values = self.features(windows, sampling_rate=AUDIO_SAMPLE_RATE,
                                       return_tensors="pt")["input_values"]
                out = self.forward(values.to(device=param.device, dtype=param.dtype),
                                   batch[0][1])
                outputs.append(out.reshape(-1, out.shape[-1]))
        return torch.cat(outputs)

    def encode(self, clips: list[DecodedAudio]) -> list[torch.Tensor]:
        chunking = self.chunking
        return [self.encode_chunks(clip.samples, chunking.spans(chunking.tokens(len(clip.samples))))
                for clip in clips]

    def save(self, directory: Path) -> None:
        self.conformer.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()},
                  str(directory / PROJECTOR_FILE))
        self.settings.write(directory)

    @classmethod
    def load(cls, directory: Path, decoder_hidden: int, dtype: torch.dtype) -> AudioEncoder:
        conformer = Wav2Vec2ConformerModel.from_pretrained(directory, dtype=dtype)
        encoder = cls(conformer, decoder_hidden, ChunkSettings.read(directory))
        encoder.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
        return encoder.to(dtype).eval()
