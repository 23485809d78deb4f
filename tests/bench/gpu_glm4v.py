"""GLM-4.1V at AutoGLM-Phone-9B's real size on one device: issue 11's GPU item.

A random GLM-4.1V of GLM-4.1V-9B-Thinking's size (tests/fixtures/real_glm4v.py
`write_glm4v_9b_shape_checkpoint`: its published config.json and small files, 40x4096
decoder, 24-block vision tower, bf16; the files come from AUTOGLM_GLM41V_FILES) is
written as a checkpoint and loaded by the service's model class, then driven by the
engine in-process (each prompt prefilled in one pass, so agents soon decode side by side)
with the phone agent's step: a 1080x2400 PNG screenshot at
max_pixels 5,000,000 (3,108 image tokens), the agent's sampling. Printed and written as
JSON: load time; memory per module (decoder, vision tower; KV per 1,000 tokens); one
agent step's time to first token and decode tokens/s; four agents' aggregate decode
tokens/s; where one decode step's time goes (model pass, choosing tokens, the rest) for
one and four agents; the device's peak allocation; beside the reference article's memory table
(decoder ~6.8 GB, vision ~2.1 GB, KV ~3.0 GB at batch 1 and 512 tokens).

Run from the repository root with PYTHONPATH=$PWD:$PWD/clients/python (after
`python protos/generate.py`):
  on a CUDA host:     python tests/bench/gpu_glm4v.py
  CPU smoke run:      BENCH_DEVICE=cpu python tests/bench/gpu_glm4v.py   (tiny phone shape)
Environment (optional): BENCH_DEVICE (cuda:0 when CUDA exists, else cpu), BENCH_NEW_TOKENS
(64 on CUDA, 32 on CPU), BENCH_WORKDIR (where the checkpoint goes; default a temp dir),
BENCH_OUT or OUT (folder for gpu_glm4v.json).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from inference_svc.engine import runner
from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.model.glm4v import Glm4vModel
from tests.bench.harness import bench_out_dir, median, render_table
from tests.bench.phone_agent import AGENT_MAX_PIXELS
from tests.bench.test_glm4v_decode import PROMPT_PASS, agent_step, decode_rate, token_times
from tests.fixtures.real_glm4v import write_glm4v_9b_shape_checkpoint
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

GIB = 1024**3
ARTICLE_GB = {"decoder": 6.8, "vision": 2.1, "audio": 1.7, "kv_512_tokens": 3.0}


class StepSplit:
    """Where the loop's decode steps go: the model's pass (synchronized, so its GPU work is
    in it), choosing the tokens, and the rest of the step (the start-to-start interval of
    passes minus both), in ms per step. Wraps the model's `decode_paged` and the loop's
    `choose_tokens` for the rest of the process."""

    def __init__(self, model: Glm4vModel, device: str) -> None:
        self.passes: list[tuple[float, float]] = []  # (start, seconds)
        self.choosing: list[float] = []
        decode, choose = model.decode_paged, runner.choose_tokens

        def sync() -> None:
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)

        def timed_decode(*args, **kwargs):
            started = time.perf_counter()
            out = decode(*args, **kwargs)
            sync()
            self.passes.append((started, time.perf_counter() - started))
            return out

        def timed_choose(*args, **kwargs):
            started = time.perf_counter()
            out = choose(*args, **kwargs)
            self.choosing.append(time.perf_counter() - started)
            return out

        model.decode_paged = timed_decode
        runner.choose_tokens = timed_choose

    def reset(self) -> None:
        self.passes.clear()
        self.choosing.clear()

    def summary(self) -> dict[str, float]:
        def ms(values: list[float]) -> float:
            return median(values) * 1000 if values else 0.0

        starts = [start for start, _ in self.passes]
        step = ms([b - a for a, b in itertools.pairwise(starts)])
        decode, choose = ms([s for _, s in self.passes]), ms(self.choosing)
        return {"step": round(step, 2), "decode_pass": round(decode, 2),
                "choose_tokens": round(choose, 2), "rest": round(step - decode - choose, 2)}


def main() -> dict:
    device = os.environ.get("BENCH_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    tokens = int(os.environ.get("BENCH_NEW_TOKENS", "64" if on_gpu else "32"))
    workdir = Path(os.environ.get("BENCH_WORKDIR") or tempfile.mkdtemp(prefix="glm4v-9b-"))
    results: dict = {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
                     "new_tokens": tokens}

    started = time.perf_counter()
    if on_gpu:
        checkpoint = write_glm4v_9b_shape_checkpoint(workdir / "glm4v-9b", device=device)
    else:
        checkpoint = write_tiny_phone_glm4v_checkpoint(workdir / "glm4v-phone")
    results["write_s"] = round(time.perf_counter() - started, 1)
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    model = Glm4vModel(checkpoint, device=device,
                       dtype=torch.bfloat16 if on_gpu else torch.float32)
    results["load_s"] = round(time.perf_counter() - started, 1)
    results["module_gib"] = {unit.name: round(unit.state().weight_bytes / GIB, 2)
                             for unit in model.units}
    results["kv_gib_per_1k_tokens"] = round(model.kv_bytes_per_token() * 1000 / GIB, 4)
    results["kv_gib_512_tokens"] = round(model.kv_bytes_per_token() * 512 / GIB, 4)

    seeds = iter(range(10_000))
    split = StepSplit(model, device)

    def decode_rates(mode: str, graphs: bool, attention: str = "gather") -> None:
        """One engine's decode tokens/s and step split for one and four agents."""
        engine = Engine(model, EngineConfig(max_pixels=AGENT_MAX_PIXELS, prefix_caching=False,
                                            prefill_chunk_tokens=PROMPT_PASS, cuda_graphs=graphs,
                                            paged_attention=attention,
                                            kv_budget_bytes=8 * GIB if on_gpu else GIB))
        first_tokens = results.setdefault("ttft_s", {}).setdefault(mode, {})
        splits = results.setdefault("step_split_ms", {}).setdefault(mode, {})

        async def agents(count: int) -> list[list[float]]:
            requests = [agent_step(f"a{next(seeds)}", next(seeds), tokens=tokens)
                        for _ in range(count)]
            sent = time.perf_counter()
            streams = await asyncio.gather(*(token_times(engine, r) for r in requests))
            first_tokens[str(count)] = round(min(s[0] for s in streams) - sent, 3)
            return streams

        def measured(count: int) -> float:
            split.reset()
            rate = decode_rate(asyncio.run(agents(count)))
            splits[str(count)] = split.summary()
            return round(rate, 1)

        engine.start()
        try:
            for count in (1, 4):  # warm up: kernels, allocator, each row bucket's graphs
                asyncio.run(agents(count))
            results.setdefault("decode_tok_s", {})[mode] = {str(k): measured(k) for k in (1, 4)}
        finally:
            engine.stop()

    # decode steps as captured CUDA graphs (the default), eager, and on a GPU eager reading
    # the pool in place (--paged-attention flex), one engine after the other
    decode_rates("graphs", graphs=True)
    decode_rates("eager", graphs=False)
    if on_gpu:
        decode_rates("flex", graphs=False, attention="flex")
    if on_gpu:
        results["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 2)
    report(results)
    return results


def report(results: dict) -> None:
    modules = results["module_gib"]
    rows = [
        ["decoder weights", f"{modules.get('decoder', 0):.2f}", f"~{ARTICLE_GB['decoder']}"],
        ["vision tower weights", f"{modules.get('vision', 0):.2f}", f"~{ARTICLE_GB['vision']}"],
        ["audio encoder", "- (GLM-4.1V has none)", f"~{ARTICLE_GB['audio']}"],
        ["KV, 512 tokens (batch 1)", f"{results['kv_gib_512_tokens']:.3f}",
         f"~{ARTICLE_GB['kv_512_tokens']}"],
    ]
    print(f"\nGLM-4.1V on {results['device']}: written in {results['write_s']} s, "
          f"loaded in {results['load_s']} s")
    print(render_table(["memory", "this run (GiB)", "reference article (GB)"], rows))
    print(f"KV per 1,000 tokens: {results['kv_gib_per_1k_tokens']} GiB; one agent step "
          f"(1080x2400 screenshot): time to first token {results['ttft_s']['graphs']['1']} s")
    for mode, rates in results["decode_tok_s"].items():
        print(f"decode tokens/s, {mode}: 1 agent {rates['1']}, 4 agents {rates['4']} "
              f"({rates['4'] / rates['1']:.2f}x)")
        for count, split in results["step_split_ms"][mode].items():
            print(f"  {count} agent(s), ms per decode step (median): {split}")
    if "peak_allocated_gib" in results:
        print(f"peak allocated: {results['peak_allocated_gib']} GiB")
    path = bench_out_dir() / "gpu_glm4v.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"numbers written to {path}")


if __name__ == "__main__":
    main()
