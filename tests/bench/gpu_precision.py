"""Which int8 and int4 kernels make GLM-4.1V-9B's decode faster than bf16 on this device:
issue 24's speed item, measured on the decoder's own matmul shapes before any model loads.

A decode step of one agent is its matmuls at a few rows: per layer q (4096->4096), k and v
(4096->256 each), o (4096->4096), gate-and-up (4096->27392) and down (13696->4096), 40
layers, and the lm_head (4096->151552). Each shape is timed at 1, 4 and 16 rows for
every way this service could multiply it:

- bf16: `F.linear` on bfloat16 weights (what `--decoder-weights bf16` runs);
- int8 torchao: torchao's int8 weight-only layer (what `--decoder-weights int8` runs on a
  GPU today; it converts the weight on every call, as it does on a CPU);
- int8 int8pack: PyTorch's `_weight_int8pack_mm` over the same int8 rows and scales (what
  `model/int8_rows.py` runs on a CPU; CUDA has a kernel too, int8mm.cu);
- int4 torchao: torchao's int4 weight-only, groups of 128, tile-packed (`--decoder-weights
  int4`; CUDA 8.0+);
- fp8 torchao: float8 weights and activations per row (`--decoder-weights fp8`; 8.9+).

Printed and written as JSON (gpu_precision.json): ms per shape and row count, the sum over
one decode pass (the 40 layers and the head) per variant, its ratio to bf16 and the bytes
per second it implies. A variant this device cannot run says why.

  on a CUDA host:  python tests/bench/gpu_precision.py
  CPU smoke run:   BENCH_DEVICE=cpu python tests/bench/gpu_precision.py   (2 layers, 1 row)
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from inference_svc.model.precision import WeightPrecision
from tests.bench.harness import report
from tests.fixtures.glm41v_9b import GLM41V_9B

ROWS = (1, 4, 16)
TEXT = GLM41V_9B["text_config"]
HIDDEN, INTER = TEXT["hidden_size"], TEXT["intermediate_size"]
KV = TEXT["num_key_value_heads"] * HIDDEN // TEXT["num_attention_heads"]
# (name, in, out, how many per decode pass)
LAYERS = TEXT["num_hidden_layers"]
SHAPES = [("q", HIDDEN, HIDDEN, LAYERS), ("k", HIDDEN, KV, LAYERS), ("v", HIDDEN, KV, LAYERS),
          ("o", HIDDEN, HIDDEN, LAYERS), ("gate_up", HIDDEN, 2 * INTER, LAYERS),
          ("down", INTER, HIDDEN, LAYERS), ("lm_head", HIDDEN, TEXT["vocab_size"], 1)]
Multiply = Callable[[torch.Tensor], torch.Tensor]


def variants(layer: nn.Linear) -> dict[str, Multiply | str]:
    """Every way to multiply by `layer`'s weight (bf16) on its device, or why not."""
    out: dict[str, Multiply | str] = {"bf16": layer}
    for name, precision in (("int8 torchao", "int8"), ("int4 torchao", "int4"),
                            ("fp8 torchao", "fp8")):
        try:
            from torchao.quantization import quantize_

            quantized = copy.deepcopy(layer)
            quantize_(quantized, WeightPrecision(precision, torch.bfloat16).torchao_config())
            quantized(torch.zeros(1, layer.in_features, dtype=torch.bfloat16,
                                  device=layer.weight.device))
            out[name] = quantized
        except Exception as error:  # the reason is the result
            out[name] = f"{type(error).__name__}: {str(error)[:120]}"
    weight = layer.weight.detach().float()
    scale = weight.abs().amax(1).clamp(min=1e-8) / 127
    qdata = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    scale = scale.to(torch.bfloat16)

    def int8pack(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, qdata, scale)

    try:
        int8pack(torch.zeros(1, layer.in_features, dtype=torch.bfloat16,
                             device=layer.weight.device))
        out["int8 int8pack"] = int8pack
    except Exception as error:
        out["int8 int8pack"] = f"{type(error).__name__}: {str(error)[:120]}"
    return out


def timed_ms(multiply: Multiply, x: torch.Tensor, repeats: int) -> float:
    """Median ms of one call (synchronized on CUDA)."""
    cuda = x.device.type == "cuda"
    times = []
    with torch.inference_mode():
        for _ in range(3):
            multiply(x)
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize(x.device)
            started = time.perf_counter()
            multiply(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> dict:
    device = os.environ.get("BENCH_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    repeats = 30 if on_gpu else 1
    shapes = SHAPES if on_gpu else [(n, i, o, min(count, 2)) for n, i, o, count in SHAPES]
    results: dict = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                     "row_counts": ROWS if on_gpu else ROWS[:1], "ms": {}, "unsupported": {}}
    weight_bytes = 0
    for name, inp, out, count in shapes:
        torch.manual_seed(0)
        layer = nn.Linear(inp, out, bias=False, dtype=torch.bfloat16, device=device)
        nn.init.normal_(layer.weight, std=0.02)
        weight_bytes += 2 * inp * out * count
        for variant, multiply in variants(layer).items():
            if isinstance(multiply, str):
                results["unsupported"][variant] = multiply
                continue
            for rows in results["row_counts"]:
                x = torch.randn(rows, inp, dtype=torch.bfloat16, device=device)
                ms = timed_ms(multiply, x, repeats)
                results["ms"].setdefault(variant, {}).setdefault(str(rows), {})[name] = (
                    round(ms, 4), count)
        del layer
        if on_gpu:
            torch.cuda.empty_cache()
    results["bf16_weight_gb"] = round(weight_bytes / 1e9, 2)
    summarize(results)
    return results


def summarize(results: dict) -> None:
    passes = {variant: {rows: sum(ms * count for ms, count in shapes.values())
                        for rows, shapes in by_rows.items()}
              for variant, by_rows in results["ms"].items()}
    results["pass_ms"] = {v: {r: round(ms, 3) for r, ms in by_rows.items()}
                          for v, by_rows in passes.items()}
    table = []
    for variant, by_rows in passes.items():
        row = [variant]
        for rows in map(str, results["row_counts"]):
            ms = by_rows[rows]
            ratio = passes["bf16"][rows] / ms
            row.append(f"{ms:.2f} ({ratio:.2f}x)")
        row.append(f"{results['bf16_weight_gb'] / (by_rows['1'] / 1000):.0f}")
        table.append(row)
    report("gpu_precision",
           f"GLM-4.1V-9B decoder matmuls, one decode pass, on {results['device']} "
           f"({results['bf16_weight_gb']} GB of bf16 weights)",
           ["variant", *(f"{r} rows: ms (vs bf16)" for r in results["row_counts"]),
            "bf16-equivalent GB/s at 1 row"], table, results,
           [f"{variant}: not run here: {why}"
            for variant, why in results["unsupported"].items()])


if __name__ == "__main__":
    main()
