"""autoglm-plan: the memory plan for a checkpoint directory and a GPU set, from its config
files and safetensors headers alone (no weights are loaded, so it runs on a CPU).

    autoglm-plan --model-dir DIR --gpus 2 --gpu-memory-gib 24 [--dtype bfloat16]
                 [--context 25480] [--kv-budget-mb MB] [--activation-budget-mb 1024]
                 [--kv-reserve-fraction 0.3] [--screenshot 1080x2400] [--max-pixels N] [--json]

Placement follows the service's: a native GLM-4.1V checkpoint goes whole onto one card
(the last, as the encoders' device); a modular bundle's decoder is spread over the cards
in order under (1 - kv_reserve_fraction) of each, its encoders on the last card.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from inference_svc.model.checkpoints.bundle import Manifest
from inference_svc.model.checkpoints.glm4v_checkpoint import VISION_PREFIXES
from inference_svc.model.checkpoints.model_dir import ModelKind, model_kind
from inference_svc.model.cli.bundle import BundleCliError, human_bytes, summarise
from inference_svc.model.glm4v_vision import VisionGeometry

PROG = "autoglm-plan"
GIB = 1024**3
MIB = 1024**2
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
IMAGE_MERGE = 2  # the modular vision encoder's 2x2 patch merge (encoders.IMAGE_MERGE)


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    kv_heads: int
    head_dim: int
    context: int

    def kv_bytes_per_token_per_layer(self, element: int) -> int:
        return 2 * self.kv_heads * self.head_dim * element  # K and V

    def kv_bytes_per_token(self, element: int) -> int:
        return self.layers * self.kv_bytes_per_token_per_layer(element)


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    kind: str
    dtype: str
    gpus: int
    gpu_memory_bytes: int
    parameters: dict[str, int]
    weights_bytes: dict[str, int]
    weights_by_device: dict[str, int]
    weights_source: str
    layers: int
    kv_heads: int
    head_dim: int
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int
    kv_device: str
    activation_reserve_bytes: int
    kv_free_bytes: int
    kv_budget_bytes: int
    kv_capacity_tokens: int
    model_context: int
    screenshot: str
    image_tokens_per_screenshot: int
    context: int
    kv_bytes_per_session: int
    concurrent_sessions: int


def decoder_shape(config: dict) -> DecoderShape:
    text = config.get("text_config") or config
    heads = int(text["num_attention_heads"])
    head_dim = text.get("head_dim") or int(text["hidden_size"]) // heads
    return DecoderShape(
        layers=int(text["num_hidden_layers"]),
        kv_heads=int(text.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        context=int(text.get("max_position_embeddings", 2048)),
    )


def meta_parameters(config_dir: Path, *, vision_prefixes: tuple[str, ...]) -> dict[str, int]:
    """Parameter counts of a checkpoint that has no weight files: the model is built on
    the meta device from its config (shapes only, no memory) and counted."""
    import torch
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(config_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    counts = {"decoder": 0, "vision": 0}
    for name, parameter in model.named_parameters():
        vision = any(name.startswith(p.removeprefix("model.")) for p in vision_prefixes)
        counts["vision" if vision else "decoder"] += parameter.numel()
    if not getattr(config, "tie_word_embeddings", False):
        text = getattr(config, "text_config", config)
        counts["decoder"] += int(text.vocab_size) * int(text.hidden_size)  # the lm_head
    return counts


def image_geometry(directory: Path, kind: ModelKind) -> VisionGeometry | int:
    """GLM-4.1V: its processor's resize rule; a modular bundle: a fixed token count."""
    if kind is ModelKind.MODULAR:
        manifest = Manifest.read(directory)
        if "vision" not in manifest.modules:
            return 0
        vit = json.loads((directory / manifest.modules["vision"].path / "config.json")
                         .read_text())
        grid = int(vit["image_size"]) // int(vit["patch_size"])
        return (grid // IMAGE_MERGE) ** 2
    processor_file = directory / "preprocessor_config.json"
    if not processor_file.is_file():
        return VisionGeometry()  # GLM-4.1V-9B-Thinking's processor
    processor = json.loads(processor_file.read_text())
    size = processor.get("size") or {}
    default = VisionGeometry()
    return VisionGeometry(
        patch_size=int(processor.get("patch_size", default.patch_size)),
        merge_size=int(processor.get("merge_size", default.merge_size)),
        temporal_patch_size=int(processor.get("temporal_patch_size",
                                              default.temporal_patch_size)),
        min_pixels=int(size.get("shortest_edge", default.min_pixels)),
        max_pixels=int(size.get("longest_edge", default.max_pixels)),
    )


def place(weights: dict[str, int], kind: ModelKind, gpus: int, per_gpu: int,
          reserve_fraction: float) -> tuple[dict[str, int], str]:
    """Bytes per device as the service places them, and the device that holds the KV."""
    if gpus == 0:
        return {"cpu": sum(weights.values())}, "cpu"
    last = f"cuda:{gpus - 1}"
    placed = {f"cuda:{i}": 0 for i in range(gpus)}
    if kind is not ModelKind.MODULAR or gpus == 1:
        device = last if kind is not ModelKind.MODULAR else "cuda:0"
        placed[device] = sum(weights.values())
        return placed, device
    left, cap = weights.get("decoder", 0), int(per_gpu * (1 - reserve_fraction))
    for i in range(gpus):  # accelerate's "auto" map fills the cards in order
        take = left if i == gpus - 1 else min(left, cap)
        placed[f"cuda:{i}"] += take
        left -= take
    for name, size in weights.items():
        if name != "decoder":
            placed[last] += size
    return placed, "cuda:0"


def plan(directory: Path, *, gpus: int, gpu_memory_bytes: int, dtype: str, context: int,
         kv_budget_bytes: int | None = None, activation_budget_bytes: int = 1024 * MIB,
         kv_reserve_fraction: float = 0.3, screenshot: tuple[int, int] = (1080, 2400),
         max_pixels: int | None = None) -> MemoryPlan:
    summary = summarise(directory)
    kind = model_kind(directory)
    element = ELEMENT_BYTES[dtype]
    parameters = {m.name: m.parameters for m in summary.modules}
    source = "safetensors headers"
    if kind is ModelKind.MODULAR:
        decoder_dir = directory / Manifest.read(directory).modules["decoder"].path
    else:
        decoder_dir = directory
    if not any(parameters.values()):
        parameters = meta_parameters(decoder_dir, vision_prefixes=VISION_PREFIXES)
        source = "config.json (meta-device model, no weight files)"
    weights = {name: count * element for name, count in parameters.items()}
    by_device, kv_device = place(weights, kind, gpus, gpu_memory_bytes, kv_reserve_fraction)
    shape = decoder_shape(json.loads((decoder_dir / "config.json").read_text()))
    per_token = shape.kv_bytes_per_token(element)
    free = max(0, gpu_memory_bytes * max(gpus, 1) - sum(by_device.values())
               - activation_budget_bytes) if kind is ModelKind.MODULAR and gpus > 1 else max(
        0, gpu_memory_bytes - by_device[kv_device] - activation_budget_bytes)
    budget = free if kv_budget_bytes is None else min(kv_budget_bytes, free)
    capacity = budget // per_token
    geometry = image_geometry(directory, kind)
    if isinstance(geometry, VisionGeometry):
        image_tokens = geometry.image_tokens(
            geometry.grid(*screenshot, max_pixels=max_pixels))
    else:
        image_tokens = geometry
    return MemoryPlan(
        model=summary.name, kind=kind, dtype=dtype, gpus=gpus,
        gpu_memory_bytes=gpu_memory_bytes, parameters=parameters, weights_bytes=weights,
        weights_by_device=by_device, weights_source=source, layers=shape.layers,
        kv_heads=shape.kv_heads, head_dim=shape.head_dim,
        kv_bytes_per_token_per_layer=shape.kv_bytes_per_token_per_layer(element),
        kv_bytes_per_token=per_token, kv_device=kv_device,
        activation_reserve_bytes=activation_budget_bytes, kv_free_bytes=free,
        kv_budget_bytes=budget, kv_capacity_tokens=capacity, model_context=shape.context,
        screenshot=f"{screenshot[0]}x{screenshot[1]}", image_tokens_per_screenshot=image_tokens,
        context=context, kv_bytes_per_session=context * per_token,
        concurrent_sessions=capacity // context if context else 0,
    )


def render(p: MemoryPlan) -> str:
    devices = "cpu" if p.gpus == 0 else f"{p.gpus} x {human_bytes(p.gpu_memory_bytes)}"
    lines = [f"{p.model}  ({p.kind}, {p.dtype}, {devices})",
             f"weights ({p.weights_source}):"]
    for name, size in p.weights_bytes.items():
        lines.append(f"  {name:<8} {p.parameters[name]:>15,} params  {size:>16,} B"
                     f"  ({human_bytes(size)})")
    lines.append("weights per device:")
    for device, size in p.weights_by_device.items():
        lines.append(f"  {device:<8} {size:>16,} B  ({human_bytes(size)})")
    lines += [
        f"KV per token: {p.kv_bytes_per_token_per_layer:,} B per layer (2 x {p.kv_heads} "
        f"KV heads x {p.head_dim} x {ELEMENT_BYTES[p.dtype]} B) x {p.layers} layers = "
        f"{p.kv_bytes_per_token:,} B",
        f"KV budget on {p.kv_device}: {p.kv_budget_bytes:,} B ({human_bytes(p.kv_budget_bytes)}"
        f"; free after weights and {human_bytes(p.activation_reserve_bytes)} activations: "
        f"{human_bytes(p.kv_free_bytes)})",
        f"KV capacity: {p.kv_capacity_tokens:,} tokens (model context {p.model_context:,})",
        f"image tokens per {p.screenshot} screenshot: {p.image_tokens_per_screenshot:,}",
        f"phone-agent sessions at {p.context:,} tokens: {p.kv_bytes_per_session:,} B each "
        f"({human_bytes(p.kv_bytes_per_session)}), {p.concurrent_sessions:,} at full length "
        f"at once",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, required=True,
                   help="a modular bundle or a native GLM-4.1V checkpoint")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (0: CPU)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0,
                   help="memory of each GPU (or of the host with --gpus 0), GiB")
    p.add_argument("--dtype", choices=sorted(ELEMENT_BYTES), default="bfloat16")
    p.add_argument("--context", type=int, default=25_480,
                   help="tokens one phone-agent session holds at full length")
    p.add_argument("--kv-budget-mb", type=float, default=None,
                   help="the service's --kv-budget-mb (default: all memory left)")
    p.add_argument("--activation-budget-mb", type=float, default=1024.0)
    p.add_argument("--kv-reserve-fraction", type=float, default=0.3)
    p.add_argument("--screenshot", default="1080x2400", help="WIDTHxHEIGHT")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the service's --max-pixels (GLM-4.1V's processor max_pixels)")
    p.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        width, height = (int(v) for v in args.screenshot.lower().split("x"))
    except ValueError:
        parser.error(f"--screenshot {args.screenshot!r} is not WIDTHxHEIGHT")
    if args.gpus < 0 or args.gpu_memory_gib <= 0 or args.context < 0:
        parser.error("--gpus, --gpu-memory-gib and --context must be positive")
    try:
        result = plan(
            args.model_dir, gpus=args.gpus, gpu_memory_bytes=int(args.gpu_memory_gib * GIB),
            dtype=args.dtype, context=args.context,
            kv_budget_bytes=None if args.kv_budget_mb is None else int(args.kv_budget_mb * MIB),
            activation_budget_bytes=int(args.activation_budget_mb * MIB),
            kv_reserve_fraction=args.kv_reserve_fraction, screenshot=(width, height),
            max_pixels=args.max_pixels,
        )
    except (BundleCliError, FileNotFoundError, KeyError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    out.write(json.dumps(asdict(result), indent=2) if args.json else render(result))
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
