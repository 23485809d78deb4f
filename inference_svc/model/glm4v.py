"""A native GLM-4.1V checkpoint (Glm4vForConditionalGeneration) as the service's model.

AutoGLM-Phone-9B has GLM-4.1V-9B-Thinking's architecture. The checkpoint directory is
loaded as it is: its tokenizer and chat template, its image processor, its weights.
Two units: the decoder (the whole model minus its vision tower) and the vision tower
(`model.visual`), which can be offloaded on its own and is reloaded from the
checkpoint's safetensors (only the tower's keys).

Images are encoded by the vision unit when a prompt is admitted and reach the decoder
as input embeddings, only for the image tokens the KV cache does not already hold; the
decoder runs on the engine's paged KV like any other (model/paged/forward.py). GLM-4.1V's
rope has three axes (time, height, width): a prompt's positions are computed over the
whole prompt from its image grids, and a generated token's position is its index plus
the prompt's offset (images take fewer positions than tokens). This keeps prefix and
session KV reuse exact for prompts with images, and the decoder never runs the tower
itself, so the two units never need each other resident.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Glm4vForConditionalGeneration,
    Glm4vVisionModel,
)
from transformers.initialization import no_init_weights

from inference_svc.errors import ModalityUnavailable
from inference_svc.model.base import PromptInputs, UnitModel
from inference_svc.model.checkpoints.glm4v_checkpoint import VISION_PREFIXES, glm4v_manifest
from inference_svc.model.checkpoints.glm4v_config import read_glm4v_config
from inference_svc.model.checkpoints.placement import split_layers
from inference_svc.model.glm4v_vision import (
    DEPLOYMENT_MAX_PIXELS,
    TowerShape,
    VisionGeometry,
    activation_bytes,
)
from inference_svc.model.inputs.media import DecodedImage, decode_image
from inference_svc.model.inputs.prompt import (
    MediaSpan,
    PromptPlan,
    media_content_ids,
    media_digest,
    media_parts,
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
from inference_svc.types import AudioPart, ChatMessage, ImagePart, TextPart

SAFETENSORS_INDEX = "model.safetensors.index.json"
# How a message's parts become the chat template's `content` (vLLM's
# --chat-template-content-format): "string" joins them into one string, the image
# placeholders first, each followed by a newline (the phone agent's deployment);
# "openai" hands the template the parts in the order sent.
CONTENT_FORMATS = ("string", "openai")


@dataclass(frozen=True)
class Glm4vMedia:
    """Decoded images and the image processor's patches, one entry per image."""

    images: list[DecodedImage]
    pixel_values: list[torch.Tensor]  # (patches, channels * temporal * patch * patch)
    grids: list[tuple[int, int, int]]  # (t, h, w) in patches


class _VisionElsewhere(nn.Module):
    """Stands in for `model.visual` inside the decoder: the tower is its own unit."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("the GLM-4.1V vision tower runs in its own unit; "
                           "pass mm_encoder_outputs to the decoder")


def _first_then(first: nn.Module, loader: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """A loader that returns an already loaded module once, then loads afresh."""
    pending = [first]

    def load() -> nn.Module:
        return pending.pop() if pending else loader()

    return load


class Glm4vModel(PagedForward, UnitModel):
    """The engine's model interface over a native GLM-4.1V checkpoint directory."""

    # what the phone agent's documented deployment gives the model (vLLM's
    # mm_processor_kwargs max_pixels): a 1080x2400 screenshot is seen at 1036x2352
    default_max_pixels = DEPLOYMENT_MAX_PIXELS

    def __init__(self, checkpoint: Path, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, content_format: str = "string",
                 decoder_weights: WeightPrecision | None = None,
                 vision_weights: WeightPrecision | None = None,
                 layer_devices: tuple[str, ...] = ()):
        """`dtype` is both units' type unless `decoder_weights` or `vision_weights` give
        that unit another precision (model/precision.py). The whole model goes on
        `device`, or with `layer_devices` the decoder's layers are split over those in
        order (checkpoints/placement.py) and the vision tower stays on `device`."""
        if content_format not in CONTENT_FORMATS:
            raise ValueError(f"content format must be one of {', '.join(CONTENT_FORMATS)}")
        self.bundle = checkpoint
        self.layer_devices = layer_devices
        self.vision_device = device
        self.device = layer_devices[0] if layer_devices else device  # the decoder's input
        self.decoder_weights = decoder_weights or WeightPrecision.of(dtype)
        self.vision_weights = vision_weights or WeightPrecision.of(dtype)
        self.dtype = self.decoder_weights.dtype  # the decoder's activations
        self.on_host = self.device == "cpu" and not layer_devices  # the decoder, whole
        self.kv_dtype = kv_dtype(self.decoder_weights, host=self.on_host)
        self.vision_dtype = self.vision_weights.dtype
        self.content_format = content_format
        self.checkpoint_config = read_glm4v_config(checkpoint)
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(checkpoint,
                                                                  local_files_only=True)
        model = self._load_full()
        # The tower's tensors may be views of the checkpoint's file mapping, which the
        # decoder keeps alive: dropping them would free nothing, so the vision unit loads
        # its own copy even the first time.
        self._vision_config = self._detach_tower(model).config
        self.config = model.config.text_config
        self.image_token_id = int(model.config.image_token_id)
        self._image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self._image_placeholder = "".join(self.tokenizer.convert_ids_to_tokens(
            [int(model.config.image_start_token_id), self.image_token_id,
             int(model.config.image_end_token_id)]))
        self._merge = int(self._vision_config.spatial_merge_size)
        self.geometry = self._geometry()
        self._tower_shape = TowerShape.of(self._vision_config, self.vision_dtype)
        self.decoder_unit = ModuleUnit("decoder", "text",
                                       _first_then(model, self._load_decoder), self.device,
                                       precision=self.decoder_weights.name,
                                       placed_by_loader=bool(layer_devices))
        vision = ModuleUnit("vision", "image", self._load_vision, self.vision_device,
                            pin_memory=True,
                            precision=self.vision_weights.name)
        self.encoders: dict[str, ModuleUnit] = {"image": vision}
        del model
        self.decoder_unit.load()
        vision.load()
        self.manifest = glm4v_manifest(checkpoint)
        self.manifest.details.update(self._files_read())

    # ---- loading ------------------------------------------------------------------

    def _geometry(self) -> VisionGeometry:
        """The image processor's resize rule and patching, as configured in the checkpoint."""
        processor = self.image_processor
        size = processor.size
        return VisionGeometry(
            patch_size=int(processor.patch_size), merge_size=int(processor.merge_size),
            temporal_patch_size=int(processor.temporal_patch_size),
            min_pixels=int(size["shortest_edge"]), max_pixels=int(size["longest_edge"]),
        )

    def _load_full(self) -> Glm4vForConditionalGeneration:
        """The whole model in the decoder's precision; a quantized decoder is quantized
        tensor by tensor as it is read, its lm_head and token table (but on the host:
        `for_the_host`) and the tower (dropped: the vision unit loads its own) left in the
        decoder's floating type."""
        # config.json as read_glm4v_config reads it (transformers misreads the flat layout)
        placed = {"device_map": self._device_map()} if self.layer_devices else \
            self.decoder_weights.placed_on(self.device)
        model = Glm4vForConditionalGeneration.from_pretrained(
            self.bundle, config=copy.deepcopy(self.checkpoint_config.config),
            local_files_only=True,
            **self.decoder_weights.pretrained_kwargs(keep=["lm_head", "model.visual"]),
            **placed,
        ).eval()
        model = with_host_kernels(model, self.decoder_weights)
        return for_the_host(model, self.decoder_weights) if self.on_host else model

    def _device_map(self) -> dict[str, str]:
        """The decoder's layers over `layer_devices`, the embedding with the first and the
        final norm and LM head with the last; the tower, loaded here only to be dropped
        (the vision unit loads its own), on the host."""
        layers = int(self.checkpoint_config.config.text_config.num_hidden_layers)
        first, last = self.layer_devices[0], self.layer_devices[-1]
        text = "model.language_model"
        return {f"{text}.embed_tokens": first, f"{text}.rotary_emb": first,
                **{f"{text}.layers.{index}": device for index, device
                   in enumerate(split_layers(layers, self.layer_devices))},
                f"{text}.norm": last, "lm_head": last, "model.visual": "cpu"}

    def _files_read(self) -> dict:
        """What GetModelInfo shows of the checkpoint's own files."""
        template = "chat_template.jinja" if (self.bundle / "chat_template.jinja").is_file() \
            else "tokenizer_config.json"
        return {"config_layout": self.checkpoint_config.layout,
                "eos_token_ids": self.eos_token_ids,
                "image_token_id": self.image_token_id,
                "image_placeholder": self._image_placeholder,
                "chat_template": template,
                "content_format": self.content_format,
                "generation_config": self.checkpoint_config.generation_file}

    @staticmethod
    def _detach_tower(model: Glm4vForConditionalGeneration) -> Glm4vVisionModel:
        tower = model.model.visual
        model.model.visual = _VisionElsewhere()
        return tower

    def _load_decoder(self) -> Glm4vForConditionalGeneration:
        model = self._load_full()
        self._detach_tower(model)  # the vision unit holds its own copy
        return model

    def _load_vision(self) -> Glm4vVisionModel:
        """Rebuild the tower and copy in its keys from the checkpoint's safetensors.

        Copied into memory of its own (not mapped from the file), so that dropping the
        tower on offload really returns its bytes. A quantized tower is quantized after it
        is whole, one Linear after another: its peak is the tower in its floating type.
        """
        with no_init_weights():
            tower = Glm4vVisionModel._from_config(self._vision_config, dtype=self.vision_dtype)
        tower.load_state_dict(self._vision_state_dict(), strict=True)
        return quantize_linears(tower, self.vision_weights).eval()

    def _vision_state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for file in self._safetensors_files():
            with safe_open(file, framework="pt") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
                    prefix = next((p for p in VISION_PREFIXES if key.startswith(p)), None)
                    if prefix is not None:
                        tensor = weights.get_tensor(key)
                        state[key.removeprefix(prefix)] = tensor.to(self.vision_dtype)
        if not state:
            raise FileNotFoundError(f"{self.bundle}: no vision tower weights in its safetensors")
        return state

    def _safetensors_files(self) -> list[Path]:
        index = self.bundle / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            names = {f for k, f in weight_map.items() if k.startswith(VISION_PREFIXES)}
            return [self.bundle / name for name in sorted(names)]
        return sorted(self.bundle.glob("*.safetensors"))

    # ---- what the engine and the transports read -------------------------------------

    def activation_bytes(self, media: Glm4vMedia) -> int:
        """The vision tower's peak activations for this request's images, from their patch
        grids (glm4v_vision.activation_bytes): what admission weighs against the
        activation budget before the tower runs."""
        return activation_bytes(self._tower_shape, [t * h * w for t, h, w in media.grids])

    @property
    def context_length(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.checkpoint_config.eos_token_ids
        if not ids and self.tokenizer.eos_token_id is not None:
            ids = [int(self.tokenizer.eos_token_id)]
        return ids

    @property
    def placeholder_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    # ---- requests -----------------------------------------------------------------

    def decode_media(self, messages: list[ChatMessage], *, max_pixels: int) -> Glm4vMedia:
        """Decode and patch each image, resized by GLM-4.1V's own rule within `max_pixels`.

        `max_pixels` means what the processor's max_pixels means (it counts the two
        temporal frames of a still image, as vLLM's `mm_processor_kwargs` max_pixels
        does); the checkpoint's own limit still caps it. Each image's DecodedImage holds
        the resized image, so usage reports the size the model saw.
        """
        images: list[DecodedImage] = []
        pixel_values: list[torch.Tensor] = []
        grids: list[tuple[int, int, int]] = []
        budget = min(max_pixels, self.geometry.max_pixels) if max_pixels > 0 else None
        for part in media_parts(messages):
            if isinstance(part, AudioPart):
                raise ModalityUnavailable(f"{part.field}: this model has no audio encoder",
                                          field=part.field)
            decoded = decode_image(part.data, part.mime_type, field=part.field, max_pixels=0)
            size = self.geometry.resized(*decoded.original_size, max_pixels=budget)
            image = decoded.image
            if image.size != size:
                image = image.resize(size, Image.Resampling.BICUBIC)
            limit = budget or self.geometry.max_pixels
            processed = self.image_processor(
                images=[image], return_tensors="pt",
                size={"shortest_edge": min(self.geometry.min_pixels, limit),
                      "longest_edge": limit})
            images.append(DecodedImage(image, decoded.original_size))
            pixel_values.append(processed["pixel_values"])
            t, h, w = (int(n) for n in processed["image_grid_thw"][0])
            grids.append((t, h, w))
        return Glm4vMedia(images, pixel_values, grids)

    def image_tokens(self, grid: tuple[int, int, int]) -> int:
        t, h, w = grid
        return t * h * w // self._merge**2

    def plan(self, messages: list[ChatMessage], media: Glm4vMedia, *,
             enable_thinking: bool) -> PromptPlan:
        """The checkpoint's chat template, each image token expanded to its feature count.

        `enable_thinking` reaches templates that have the switch; GLM-4.1V-9B-Thinking's
        own has none (the model always thinks), and its prompt is then exactly vLLM's."""
        chat = [self._template_message(message) for message in messages]
        digests = [media_digest(part.data) for message in messages for part in message.parts
                   if isinstance(part, ImagePart)]
        text = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        segments = text.split(self._image_token)
        if len(segments) != len(media.grids) + 1:
            raise RuntimeError(f"the chat template rendered {len(segments) - 1} image tokens "
                               f"for {len(media.grids)} images")
        ids: list[int] = []
        content_ids: list[int] = []
        spans: list[MediaSpan] = []
        for index, segment in enumerate(segments):
            encoded = self.tokenizer.encode(segment, add_special_tokens=False)
            ids += encoded
            content_ids += encoded
            if index < len(media.grids):
                length = self.image_tokens(media.grids[index])
                spans.append(MediaSpan("image", index, len(ids), length))
                ids += [self.image_token_id] * length
                content_ids += media_content_ids(digests[index], length)
        return PromptPlan(input_ids=ids, spans=spans, content=content_ids,
                          answer_tags=True)

    def _template_message(self, message: ChatMessage) -> dict:
        """One message as the chat template's input.

        The real template renders `{{ msg.content }}` for system and assistant turns, so
        their content must be a string (a list would reach the model as Python list
        syntax). In the "string" content format every turn is a string, as vLLM makes
        it: the text parts joined by newlines, after one placeholder per image, each
        followed by a newline; in the "openai" format a user turn keeps its parts in
        order. The image token typed in a user's text is dropped: it would shift every
        image's features.
        """
        texts = [part.text.replace(self._image_token, "") for part in message.parts
                 if isinstance(part, TextPart)]
        if self.content_format == "openai" and message.role == "user":
            content = [{"type": "text", "text": part.text.replace(self._image_token, "")}
                       if isinstance(part, TextPart) else {"type": "image"}
                       for part in message.parts if isinstance(part, TextPart | ImagePart)]
            return {"role": message.role, "content": content}
        images = sum(isinstance(part, ImagePart) for part in message.parts)
        text = "\n".join(texts)
        pieces = [self._image_placeholder] * images + ([text] if text or not images else [])
        return {"role": message.role, "content": "\n".join(pieces)}

    def prompt_inputs(self, plan: PromptPlan, media: Glm4vMedia, *, cached: int = 0,
                      live: None = None) -> PromptInputs:
        """Decoder inputs of the positions from `cached` on: token embeddings with the
        tower's features in the image slots (only the images not wholly cached are
        encoded), and their rope positions."""
        ids = torch.tensor(plan.input_ids[cached:], device=self.device)
        features = self._uncached_image_features(plan, media, cached)
        with self.decoder_unit.use() as decoder, torch.inference_mode():
            embeds = decoder.get_input_embeddings()(ids)
            if features is not None:
                slots = self._image_slots(plan)[cached:]
                embeds[slots.to(embeds.device)] = features.to(embeds.device, embeds.dtype)
        positions, offset = self._rope_positions(plan, media)
        return PromptInputs(embeds, None if positions is None else positions[:, cached:],
                            offset)

    @staticmethod
    def _image_slots(plan: PromptPlan) -> torch.Tensor:
        """Which of the plan's positions hold image features (by its spans, not by token
        id: a generated token may equal the image token)."""
        slots = torch.zeros(len(plan.input_ids), dtype=torch.bool)
        for span in plan.spans:
            slots[span.start:span.start + span.length] = True
        return slots

    def _rope_positions(self, plan: PromptPlan,
                        media: Glm4vMedia) -> tuple[torch.Tensor | None, int]:
        """The prompt's (time, height, width) positions [3, n] as the model computes them,
        and the offset of the tokens after it; None and 0 for text alone (index = position)."""
        if not plan.spans:
            return None, 0
        ids = torch.tensor([plan.input_ids])
        token_types = self._image_slots(plan).int()[None]
        grids = torch.tensor([media.grids[s.index] for s in plan.spans])
        with self.decoder_unit.use() as decoder:
            positions, offsets = decoder.model.get_rope_index(
                ids, mm_token_type_ids=token_types, image_grid_thw=grids)
        return positions[:, 0], int(offsets[0, 0])

    @staticmethod
    def _decoder_layers(decoder: nn.Module) -> list[nn.Module]:
        return list(decoder.model.language_model.layers)

    def _uncached_image_features(self, plan: PromptPlan, media: Glm4vMedia,
                                 cached: int) -> torch.Tensor | None:
        needed = [s for s in plan.spans if s.start + s.length > cached]
        if not needed:
            return None
        pixels = torch.cat([media.pixel_values[s.index] for s in needed])
        grids = torch.tensor([media.grids[s.index] for s in needed])
        with self.encoders["image"].use() as tower, torch.inference_mode():
            features = tower(pixels.to(self.vision_device, self.vision_dtype),
                             grid_thw=grids.to(self.vision_device),
                             return_dict=True).pooler_output
        rows = []
        offset = 0
        for span in needed:
            skip = max(0, cached - span.start)
            rows.append(features[offset + skip : offset + span.length])
            offset += span.length
        return torch.cat(rows)
