"""The modular model: a decoder and optional encoders, each a separately resident unit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from inference_svc.errors import InvalidRequest, ModalityUnavailable
from inference_svc.model.audio_chunks import AudioChunking
from inference_svc.model.base import PromptInputs, UnitModel
from inference_svc.model.checkpoints.bundle import Manifest
from inference_svc.model.checkpoints.placement import Placement
from inference_svc.model.encoders import (
    AUDIO_SAMPLE_RATE,
    WINDOW_BATCH,
    AudioEncoder,
    VisionEncoder,
)
from inference_svc.model.inputs.live_audio import LiveAudio
from inference_svc.model.inputs.media import (
    DecodedAudio,
    DecodedImage,
    decode_image,
    decode_pcm,
    decode_wav,
)
from inference_svc.model.inputs.prompt import (
    PromptPlan,
    media_digest,
    media_parts,
    render_prompt,
)
from inference_svc.model.paged.forward import PagedForward
from inference_svc.model.precision import (
    WeightPrecision,
    for_the_host,
    kv_dtype,
    quantize_linears,
    with_host_kernels,
)
from inference_svc.model.units import ModuleUnit
from inference_svc.model.vit_activations import vit_activation_bytes


@dataclass(frozen=True)
class DecodedMedia:
    images: list[DecodedImage]
    audios: list[DecodedAudio]


def _load_decoder(directory: Path, precision: WeightPrecision, placed: dict, *,
                  host: bool) -> nn.Module:
    """The decoder in `precision`: a quantized one is quantized tensor by tensor as
    transformers reads the checkpoint, so its full-precision weights are never all in
    memory at once; the embeddings stay in `precision.dtype`, and so does the lm_head,
    but on the `host` (`for_the_host`)."""
    config = AutoConfig.from_pretrained(directory)
    # The embedded default's config still names the GGUF file its weights were
    # dequantised from; its safetensors are plain, and a torchao config may not be merged
    # with a GGUF one.
    source = getattr(config, "quantization_config", None)
    if isinstance(source, dict) and source.get("quant_method") == "gguf":
        del config.quantization_config
    decoder = AutoModelForCausalLM.from_pretrained(
        directory, config=config, **precision.pretrained_kwargs(keep=["lm_head"]),
        **placed).eval()
    decoder = with_host_kernels(decoder, precision)
    return for_the_host(decoder, precision) if host else decoder


class ModularModel(PagedForward, UnitModel):
    """Loads a modular bundle; exposes prompt planning, encoding and the decoder."""

    def __init__(self, bundle: Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 placement: Placement | None = None,
                 decoder_weights: WeightPrecision | None = None,
                 vision_weights: WeightPrecision | None = None):
        """`dtype` is every module's type; `decoder_weights` and `vision_weights`, where
        given, hold those modules in another precision (model/precision.py)."""
        self.bundle = bundle
        self.manifest = Manifest.read(bundle)
        placement = placement or Placement(device, device)
        self.placement = placement
        decoder_weights = decoder_weights or WeightPrecision.of(dtype)
        vision_weights = vision_weights or WeightPrecision.of(dtype)
        host = not placement.sharded and placement.decoder_device == "cpu"
        self.dtype = decoder_weights.dtype  # the decoder's activations
        self.kv_dtype = kv_dtype(decoder_weights, host=host)
        decoder_dir = bundle / self.manifest.modules["decoder"].path
        self.tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
        placed = {"device_map": "auto", "max_memory": placement.max_memory} if (
            placement.sharded) else decoder_weights.placed_on(placement.decoder_device)
        self.decoder_unit = ModuleUnit(
            "decoder", "text", lambda: _load_decoder(decoder_dir, decoder_weights, placed,
                                                     host=host),
            "cuda:0" if placement.sharded else placement.decoder_device,
            placed_by_loader=placement.sharded, precision=decoder_weights.name,
        )
        self.decoder_unit.load()
        with self.decoder_unit.use() as decoder:
            self.config = decoder.config
            self.generation_config = decoder.generation_config
            # inputs go where the embedding table lives (the first shard when mapped)
            self.device = str(decoder.get_input_embeddings().weight.device)
        device = placement.encoder_device
        hidden = self.config.hidden_size
        self.encoders: dict[str, ModuleUnit] = {}
        if "vision" in self.manifest.modules:
            path = bundle / self.manifest.modules["vision"].path
            self.encoders["image"] = ModuleUnit(
                "vision", "image",
                lambda path=path: quantize_linears(
                    VisionEncoder.load(path, hidden, vision_weights.dtype), vision_weights),
                device, pin_memory=True, precision=vision_weights.name,
            )
        if "audio" in self.manifest.modules:
            path = bundle / self.manifest.modules["audio"].path
            self.encoders["audio"] = ModuleUnit(
                "audio", "audio", lambda path=path: AudioEncoder.load(path, hidden, dtype), device,
                pin_memory=True, precision=WeightPrecision.of(dtype).name,
            )
        for unit in self.encoders.values():
            unit.load()
        self._image_tokens = 0
        self._audio_chunking: AudioChunking | None = None
        self._image_activation_bytes = 0
        self._audio_activation_bytes_per_window = 0
        element = torch.tensor([], dtype=dtype).element_size()
        if "image" in self.encoders:
            with self.encoders["image"].use() as vision:
                self._image_tokens = vision.tokens_per_image
                self._image_activation_bytes = vit_activation_bytes(
                    vision.vit.config, vision_weights.dtype.itemsize)
        if "audio" in self.encoders:
            with self.encoders["audio"].use() as audio:
                self._audio_chunking = chunking = audio.chunking
                conv = audio.conformer.config
                window = (chunking.left_tokens + chunking.chunk_tokens) * chunking.token_samples
                # the first convolution's output (before any downsampling) dominates
                first_frames = (window - conv.conv_kernel[0]) // conv.conv_stride[0] + 1
                self._audio_activation_bytes_per_window = (
                    2 * element * conv.conv_dim[0] * first_frames)

    @property
    def context_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            ids = [*ids, im_end]
        return sorted({int(i) for i in ids if i is not None})

    @property
    def placeholder_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.unk_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def activation_bytes(self, media: DecodedMedia) -> int:
        """Peak encoder activations the request's media need (an estimate from geometry:
        the widest per-layer tensors of each encoder, times a working-set factor)."""
        windows = 0
        if media.audios:  # encoded WINDOW_BATCH chunk windows at a time, clip by clip
            chunks = max(len(self._audio_chunking.spans(self.audio_tokens(len(a.samples))))
                         for a in media.audios)
            windows = min(chunks, WINDOW_BATCH)
        return (len(media.images) * self._image_activation_bytes
                + windows * self._audio_activation_bytes_per_window)

    def audio_tokens(self, num_samples: int) -> int:
        """Tokens an audio clip becomes; computed from the config, not the module."""
        return self._audio_chunking.tokens(num_samples)

    def live_audio(self, digest: bytes) -> LiveAudio:
        """An utterance to stream into a prompt (GenerateLive)."""
        if self._audio_chunking is None:
            raise ModalityUnavailable("audio: this model has no audio encoder", field="audio")
        return LiveAudio(self._audio_chunking, digest=digest)

    def decode_media(self, messages, *, max_pixels: int) -> DecodedMedia:
        images, audios = [], []
        for part in media_parts(messages):
            kind = "image" if hasattr(part, "mime_type") else "audio"
            if kind not in self.encoders:
                raise ModalityUnavailable(f"{part.field}: this model has no {kind} encoder",
                                          field=part.field)
            if kind == "audio" and part.live:
                continue  # it streams in (LiveAudio)
            if kind == "image":
                images.append(decode_image(part.data, part.mime_type, field=part.field,
                                           max_pixels=max_pixels))
            elif part.wav:
                audios.append(decode_wav(part.wav, field=part.field,
                                         target_rate=AUDIO_SAMPLE_RATE))
            elif part.pcm:
                audios.append(decode_pcm(
                    part.pcm, sample_rate=part.sample_rate, encoding=part.encoding,
                    channels=part.channels, field=part.field, target_rate=AUDIO_SAMPLE_RATE,
                ))
            else:
                raise InvalidRequest(f"{part.field}: audio part has neither wav nor pcm data",
                                     field=part.field)
        return DecodedMedia(images, audios)

    def plan(self, messages, media: DecodedMedia, *, enable_thinking: bool) -> PromptPlan:
        lengths: list[int] = []
        digests: list[bytes] = []
        images, audios = iter(media.images), iter(media.audios)
        live = None  # which medium streams in: 0 tokens long until it does (live_plan)
        for number, part in enumerate(media_parts(messages)):
            digests.append(media_digest(part.data if hasattr(part, "mime_type")
                                        else part.wav or part.pcm))
            if hasattr(part, "mime_type"):
                next(images)
                lengths.append(self._image_tokens)
            elif part.live:
                live = number
                lengths.append(0)
            else:
                lengths.append(self.audio_tokens(len(next(audios).samples)))
        plan = render_prompt(self.tokenizer, messages, enable_thinking=enable_thinking,
                             media_lengths=lengths, media_digests=digests,
                             placeholder_id=self.placeholder_id)
        if live is not None:
            plan.spans[live] = replace(plan.spans[live], live=True)
        return plan

    def prompt_inputs(self, plan: PromptPlan, media: DecodedMedia, *, cached: int = 0,
                      live: LiveAudio | None = None) -> PromptInputs:
        """Decoder inputs for the prompt positions after `cached` (1D rope: no positions);
        `live` gives the live audio span's embeddings."""
        return PromptInputs(self.embed(plan, media, cached=cached, live=live)[0, cached:])

    @staticmethod
    def _decoder_layers(decoder: nn.Module) -> list[nn.Module]:
        return list(decoder.model.layers)

    def embed(self, plan: PromptPlan, media: DecodedMedia, *, cached: int = 0,
              live: LiveAudio | None = None) -> torch.Tensor:
        """Decoder input embeddings with encoder outputs in the media slots.

        Media lying wholly inside the first `cached` positions are not encoded: those
        positions come from a KV cache and their embeddings are never read.
        """
        needed = [s for s in plan.spans if s.length and s.start + s.length > cached]
        by_kind: dict[str, dict[int, torch.Tensor]] = {"image": {}, "audio": {}}
        for kind, unit_key, items in (("image", "image", media.images),
                                      ("audio", "audio", media.audios)):
            indices = [s.index for s in needed if s.kind == kind and not s.live]
            if indices:
                with self.encoders[unit_key].use() as encoder:
                    encoded = encoder.encode([items[i] for i in indices])
                by_kind[kind] = dict(zip(indices, encoded, strict=True))
        for span in needed:
            if span.live:
                with self.encoders["audio"].use() as encoder:
                    by_kind["audio"][span.index] = live.embeddings(encoder, span.length)
        with self.decoder_unit.use() as decoder, torch.inference_mode():
            ids = torch.tensor([plan.input_ids], device=self.device)
            embeds = decoder.get_input_embeddings()(ids)
            for span in needed:
                vectors = by_kind[span.kind][span.index]
                embeds[0, span.start : span.start + span.length] = vectors.to(
                    device=embeds.device, dtype=embeds.dtype)
        return embeds
