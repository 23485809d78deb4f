"""Weight precision on the embedded default (trained SmolLM2-135M weights, loaded as the
service loads them): what each precision costs in quality, bytes and CPU speed.

- perplexity over a fixed real text that ships with an installed package: the Mozilla
  Public License 2.0 as orjson ships it (`orjson-*.dist-info/licenses/LICENSE-MPL-2.0`,
  3,712 SmolLM2 tokens of English prose), in 1,024-token windows;
- greedy agreement with fp32: 20 prompts, 64 tokens each, through the service's engine
  (paged forward and decode steps); a prompt agrees when all 64 tokens are fp32's;
- the decoder's weight bytes as the service reports them, and the peak resident memory
  of a process loading the model in that precision;
- single-stream greedy decode tokens/s through the engine, rounds alternating.

At AutoGLM-Phone-9B's size (random weights, so no perplexity): two GLM-4.1V-9B decoder
layers quantized as the service does it, their contribution to the hidden state in int8
and bf16 against fp32, beside int8's rounding of the weights alone.

int8 and int4 on the host hold the (tied) lm_head in int8, as an untied copy beside the
embedding table (model/precision.py `with_host_head`); int4 is grouped by 32 columns on
the host (model/int4_groups.py). The embedded default was made from a Q4_1 GGUF (4 bits
in blocks of 32), so int4 there holds nearly its own weights: its perplexity says what
int4 costs this model, not what it costs one trained in float (the 9B-shape layers
below measure int4's rounding on normal weights). fp8 has no CPU kernel and is refused on
a CPU (`--decoder-weights` names it).

    .venv/bin/python -m pytest tests/bench/test_quantization_quality.py -m bench -s
"""

from __future__ import annotations

import importlib.metadata
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from inference_svc.model.checkpoints.placement import bytes_by_device
from inference_svc.model.modular import ModularModel
from inference_svc.model.precision import (
    UnsupportedPrecision,
    quantize_linears,
    resolve_precision,
)
from tests.bench.engine_runs import (
    COMPUTE_THREADS,
    SPEED_TOKENS,
    decode_run,
    greedy,
    load,
    run_engine,
)
from tests.bench.harness import median, print_load, repeats, report

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

WINDOW = 1024
AGREEMENT_TOKENS = 64
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child.",
    "List three uses of a paperclip.",
    "How do I boil an egg?",
    "What is 17 times 23?",
    "Give me a short motivational quote.",
    "Describe a cat in two sentences.",
    "What causes rain?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Suggest a name for a coffee shop.",
    "What is the difference between weather and climate?",
    "Write one sentence about autumn leaves.",
    "How many legs does a spider have?",
    "What does a phone's battery saver mode do?",
    "Summarise the story of Cinderella in three sentences.",
    "What is a prime number?",
    "Tell me a fun fact about octopuses.",
    "How can I open the settings app on an Android phone?",
]


def reference_text() -> tuple[Path, str]:
    try:
        files = importlib.metadata.files("orjson") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the reference text ships with orjson, which is not installed")
    path = next(Path(f.locate()) for f in files if f.name == "LICENSE-MPL-2.0")
    return path, path.read_text()


def decoder_bytes(model: ModularModel) -> int:
    with model.decoder_unit.use() as decoder:
        return sum(bytes_by_device(decoder).values())


@torch.inference_mode()
def perplexity(model: ModularModel, text: str) -> float:
    ids = model.tokenizer(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with model.decoder_unit.use() as decoder:
        for start in range(0, len(ids) - 1, WINDOW):
            window = ids[start:start + WINDOW + 1][None]
            logits = decoder(window[:, :-1]).logits.float()
            loss = nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum")
            total += float(loss)
            count += window.shape[1] - 1
    return math.exp(total / count)


def peak_rss_loading(bundle: Path, name: str) -> tuple[int, int]:
    """(peak, after) resident bytes of a fresh process that loads the model in `name`."""
    script = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from inference_svc.model.modular import ModularModel\n"
        "from inference_svc.model.precision import resolve_precision\n"
        "p = resolve_precision('--decoder-weights', sys.argv[2], torch.float32, ['cpu'])\n"
        "m = ModularModel(Path(sys.argv[1]), decoder_weights=p)\n"
        "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
        "print(int(status['VmHWM'].split()[0]) * 1024, int(status['VmRSS'].split()[0]) * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(bundle), name], check=True,
                          capture_output=True, text=True)
    peak, after = done.stdout.split()[-2:]
    return int(peak), int(after)


def agreement(reference: list[list[int]], ids: list[list[int]]) -> tuple[int, float, float]:
    """Prompts whose tokens all match, mean matching prefix, share of equal positions."""
    prefixes = []
    for ref, got in zip(reference, ids, strict=True):
        prefixes.append(next((i for i, (a, b) in enumerate(zip(ref, got, strict=True))
                              if a != b), len(ref)))
    same = sum(a == b for ref, got in zip(reference, ids, strict=True)
               for a, b in zip(ref, got, strict=True))
    return (sum(p == AGREEMENT_TOKENS for p in prefixes), sum(prefixes) / len(prefixes),
            same / (len(reference) * AGREEMENT_TOKENS))


def test_quality_bytes_and_cpu_speed_per_precision(default_bundle):
    path, text = reference_text()
    print_load("quantization_quality")
    names = ["fp32", "bf16", "fp16", "int8", "int4"]
    prompts = [greedy(AGREEMENT_TOKENS, i, p) for i, p in enumerate(PROMPTS)]
    results: dict[str, dict] = {}
    for name in names:
        model = load(default_bundle, name)
        ids = [ids for ids, _ in run_engine(model, prompts)]
        results[name] = {"perplexity": perplexity(model, text), "ids": ids,
                         "decoder_bytes": decoder_bytes(model)}
        results[name]["peak_rss"], results[name]["rss"] = peak_rss_loading(
            default_bundle, name)
        del model
    speeds: dict[str, list[float]] = {"fp32": [], "int8": [], "int4": []}
    models = {name: load(default_bundle, name) for name in speeds}
    for _ in range(repeats(3)):
        for name, model in models.items():
            speeds[name].append(decode_run(model)[1])
    refused = {}
    for name in ("fp8",):
        with pytest.raises(UnsupportedPrecision) as error:
            resolve_precision("--decoder-weights", name, torch.float32, ["cpu"])
        refused[name] = str(error.value)

    full = results["fp32"]["perplexity"]
    rows = []
    for name in names:
        r = results[name]
        identical, prefix, share = agreement(results["fp32"]["ids"], r["ids"])
        r.update(identical=identical, mean_prefix=prefix, equal_positions=share)
        rate = f"{median(speeds[name]):.1f}" if name in speeds else "-"
        rows.append([name, f"{r['perplexity']:.3f}", f"{r['perplexity'] / full - 1:+.2%}",
                     f"{identical}/{len(PROMPTS)}", f"{prefix:.1f}", f"{share:.1%}",
                     f"{r['decoder_bytes'] / 2**20:.1f}",
                     f"{r['peak_rss'] / 2**20:.0f}", f"{r['rss'] / 2**20:.0f}", rate])
    rows += [[name, "-", "-", "-", "-", "-", "-", "-", "-", "refused on a CPU"]
             for name in refused]
    report("quantization_quality",
           f"Embedded default decoder per precision on {COMPUTE_THREADS} CPU threads "
           f"(perplexity over {path.name}, {AGREEMENT_TOKENS}-token greedy agreement with fp32 "
           f"on {len(PROMPTS)} prompts, single-stream decode of {SPEED_TOKENS} tokens, median "
           f"of {len(speeds['fp32'])} alternating rounds)",
           ["precision", "perplexity", "vs fp32", "identical", "mean prefix", "equal tokens",
            "decoder MiB", "load peak RSS MiB", "RSS MiB", "decode tok/s"], rows,
           {"text": str(path), "results": {k: {kk: vv for kk, vv in v.items() if kk != "ids"}
                                           for k, v in results.items()},
            "speeds": speeds, "refused": refused},
           notes=[f"text: {path}", *(f"{k}: {v}" for k, v in refused.items())])
    assert results["int8"]["perplexity"] < full * 1.01
    assert results["int4"]["perplexity"] < full * 1.05
    assert results["int8"]["decoder_bytes"] < results["fp32"]["decoder_bytes"] / 2
    assert results["int4"]["decoder_bytes"] < results["int8"]["decoder_bytes"]



def int4_rounding(weight: torch.Tensor, group: int = 32) -> float:
    """What int4 in groups of `group` (asymmetric: min and max of each group, as torchao's
    tinygemm parameters) does to `weight` alone, relative to it."""
    groups = weight.reshape(-1, group)
    low, high = groups.amin(1, keepdim=True), groups.amax(1, keepdim=True)
    scale = (high - low).clamp(min=1e-6) / 15
    rounded = torch.round((groups - low) / scale).clamp(0, 15) * scale + low
    return float((rounded - groups).norm() / groups.norm())


def test_9b_shape_layers_quantized_stay_within_the_quantization_error():
    """Two GLM-4.1V-9B decoder layers (random weights at the real widths, bf16, as the
    service quantizes them on the host): the layers' contribution to the hidden state in
    int8, int4 and bf16 against fp32, beside what each rounding does to the weights
    alone."""
    import copy

    from transformers.models.glm4v.modeling_glm4v import (
        Glm4vTextConfig,
        Glm4vTextDecoderLayer,
        Glm4vTextRotaryEmbedding,
    )

    from inference_svc.model.precision import WeightPrecision
    from tests.fixtures.glm41v_9b import GLM41V_9B

    config = Glm4vTextConfig(**GLM41V_9B["text_config"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = []
    for index in range(2):
        layer = Glm4vTextDecoderLayer(config, index).eval()
        for weight in (p for p in layer.parameters() if p.dim() == 2):
            nn.init.normal_(weight, std=config.initializer_range)
        layers.append(layer.to(torch.bfloat16))
    tokens = 16
    hidden = torch.randn(1, tokens, config.hidden_size)
    positions = torch.arange(tokens)[None].expand(3, 1, tokens)
    rope = Glm4vTextRotaryEmbedding(config)

    def contribution(stack: list[nn.Module], dtype: torch.dtype) -> torch.Tensor:
        state = hidden.to(dtype)
        angles = rope(state, positions)
        with torch.inference_mode():
            for layer in stack:
                out = layer(state, position_embeddings=angles, attention_mask=None,
                            position_ids=positions)
                state = out[0] if isinstance(out, tuple) else out
        return state.float() - hidden

    reference = contribution([copy.deepcopy(layer).float() for layer in layers], torch.float32)
    stacks = {"bf16": layers}
    for name in ("int8", "int4"):
        stacks[name] = [quantize_linears(copy.deepcopy(layer),
                                         WeightPrecision(name, torch.bfloat16))
                        for layer in layers]
    errors = {name: float((contribution(stack, torch.bfloat16) - reference).norm()
                          / reference.norm())
              for name, stack in stacks.items()}
    weights = [p.detach().float() for layer in layers for p in layer.parameters()
               if p.dim() == 2]
    rounding = max(float((torch.round(w / s) * s - w).norm() / w.norm())
                   for w in weights for s in [w.abs().amax(dim=1, keepdim=True) / 127])
    rounding4 = max(int4_rounding(w) for w in weights)
    report("quantization_9b_layers",
           "GLM-4.1V-9B widths, 2 decoder layers, 16 positions: error of the layers' "
           "contribution against fp32",
           ["precision", "relative error"],
           [["bf16", f"{errors['bf16']:.2%}"],
            ["int8 (weights; bf16 compute)", f"{errors['int8']:.2%}"],
            ["int4, groups of 32 (weights; bf16 compute)", f"{errors['int4']:.2%}"],
            ["int8 rounding of the weights alone (worst matrix)", f"{rounding:.2%}"],
            ["int4 rounding of the weights alone (worst matrix)", f"{rounding4:.2%}"]],
           {"errors": errors, "weight_rounding": rounding, "int4_weight_rounding": rounding4})
    # each layer chains about four matrices (q/k/v -> o, gate_up -> down): their rounding
    # errors add in quadrature on top of bf16's own
    assert errors["int8"] <= errors["bf16"] + 4 * rounding
    assert errors["int4"] <= errors["bf16"] + 4 * rounding4
