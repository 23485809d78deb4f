"""Where a small decoder's step goes on this device: kernel launches or the GPU's work.

Prints (and writes gpu_step_overhead.json): the time of one tiny kernel launched back to
back; the host's Python speed (a 2-million-term sum); one eager forward of one token
through the throughput benchmark's random Qwen2.5-0.5B-shaped decoder
(tests/bench/gpu_throughput.py SHAPES) with a KV cache of 128 tokens, as seen by the host
and as the GPU's own events time it; and its layers replayed as one captured CUDA graph.
When the host time is far above the GPU's, decode speed is set by launches, not by memory
bandwidth, for every server that runs the model eagerly.

Run from the repository root with PYTHONPATH=$PWD:$PWD/clients/python on a CUDA host:
  python tests/bench/gpu_step_overhead.py
"""

from __future__ import annotations

import json
import os
import time

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

from tests.bench.gpu_throughput import SHAPES
from tests.bench.harness import bench_out_dir

REPEATS = 50


def host_ms(work, repeats: int = REPEATS) -> float:
    for _ in range(3):
        work()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / repeats


def gpu_ms(work, repeats: int = REPEATS) -> float:
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    work()
    torch.cuda.synchronize()
    begin.record()
    for _ in range(repeats):
        work()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / repeats


def captured(work) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture, as CUDA graphs require
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        work()
    return graph


def record(results: dict, name: str, measure) -> None:
    """One measurement; a failure is written down and the others still run."""
    try:
        results[name] = round(measure(), 3)
    except Exception as error:
        results[name] = f"failed: {type(error).__name__}: {error}"[:300]


def main() -> dict:
    device = os.environ.get("BENCH_DEVICE", "cuda:0")
    torch.cuda.set_device(device)
    results: dict = {"device": torch.cuda.get_device_name(device)}
    small = torch.ones(16, device=device)
    results["launch_us"] = round(host_ms(lambda: small.add_(1), 2000) * 1000, 1)
    started = time.perf_counter()
    sum(range(2_000_000))
    results["python_sum_2m_ms"] = round((time.perf_counter() - started) * 1000, 1)

    config = Qwen2Config(**SHAPES["qwen2.5-0.5b"])
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 128), device=device)
    with torch.inference_mode():
        cache = DynamicCache(config=config)
        model(input_ids=ids, cache=cache, use_cache=True)
        token = ids[:, -1:]

        def step() -> None:
            model(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-1)  # the same 129th position every time

        record(results, "eager_step_host_ms", lambda: host_ms(step))
        record(results, "eager_step_gpu_ms", lambda: gpu_ms(step))

        static = torch.zeros(1, 1, config.hidden_size, dtype=torch.bfloat16, device=device)
        layers = model.model.layers

        def layers_only() -> torch.Tensor:  # no cache: the captured work is fixed-shape
            hidden = static
            positions = torch.zeros(1, 1, dtype=torch.long, device=device)
            embeddings = model.model.rotary_emb(hidden, positions)
            for layer in layers:
                hidden = layer(hidden, position_embeddings=embeddings, attention_mask=None)
            return model.lm_head(model.model.norm(hidden))

        record(results, "eager_layers_host_ms", lambda: host_ms(layers_only))
        record(results, "graph_layers_host_ms", lambda: host_ms(captured(layers_only).replay))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["weight_mb"] = round(weight_bytes / 1e6)
    print(json.dumps(results, indent=2), flush=True)
    (bench_out_dir() / "gpu_step_overhead.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
