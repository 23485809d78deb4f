"""Vision and audio encoders with the projectors that map them into the decoder's space.

Each encoder is a standard transformers model (ViT, Wav2Vec2-Conformer) saved as its own
checkpoint; the projector beside it is a small MLP saved as projector.safetensors.
"""

from __future__ import annotations

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

from inference_svc.model.inputs.media import DecodedAudio, DecodedImage

PROJECTOR_FILE = "projector.safetensors"
# Width of the projector's hidden layer: the reference model's 512-d encoder output.
PROJECTOR_WIDTH = 512
IMAGE_MERGE = 2  # 2x2 neighbouring patches become one image token
AUDIO_MERGE = 4  # 4 consecutive frames (80 ms) become one audio token
AUDIO_SAMPLE_RATE = 16_000


def conv_receptive_field(layers: list[tuple[int, int]]) -> int:
    """Fewest input samples from which an unpadded (kernel, stride) stack makes one frame."""
    field, jump = 1, 1
    for kernel, stride in layers:
        field += (kernel - 1) * jump
        jump *= stride
    return field


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
    """Conformer frames, merged 4 at a time and projected to decoder embeddings."""

    def __init__(self, conformer: Wav2Vec2ConformerModel, decoder_hidden: int) -> None:
        super().__init__()
        self.conformer = conformer
        self.projector = _projector(conformer.config.hidden_size * AUDIO_MERGE, decoder_hidden)
        self.features = Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=AUDIO_SAMPLE_RATE, do_normalize=True,
            return_attention_mask=False,
        )

    @property
    def architecture(self) -> str:
        return f"{type(self.conformer).__name__}+projector"

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        frames = self.conformer(input_values=waveform).last_hidden_state
        batch, count, hidden = frames.shape
        pad = (-count) % AUDIO_MERGE
        if pad:
            frames = torch.cat([frames, frames[:, -1:].expand(batch, pad, hidden)], dim=1)
        merged = frames.reshape(batch, -1, hidden * AUDIO_MERGE)
        return self.projector(merged)

    @torch.inference_mode()
    def encode(self, clips: list[DecodedAudio]) -> list[torch.Tensor]:
        param = next(self.parameters())
        outputs = []
        for clip in clips:  # clips differ in length; encoding one by one avoids padding effects
            values = self.features(
                np.asarray(clip.samples), sampling_rate=AUDIO_SAMPLE_RATE, return_tensors="pt"
            )["input_values"]
            outputs.append(self.forward(values.to(device=param.device, dtype=param.dtype))[0])
        return outputs

    def save(self, directory: Path) -> None:
        self.conformer.save_pretrained(directory)
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()},
                  str(directory / PROJECTOR_FILE))

    @classmethod
    def load(cls, directory: Path, decoder_hidden: int, dtype: torch.dtype) -> AudioEncoder:
        conformer = Wav2Vec2ConformerModel.from_pretrained(directory, dtype=dtype)
        encoder = cls(conformer, decoder_hidden)
        encoder.projector.load_state_dict(load_file(str(directory / PROJECTOR_FILE)))
        return encoder.to(dtype).eval()
