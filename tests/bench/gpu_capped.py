"""Fit-the-cards on one lent GPU (issue 24): the 9B-shape GLM-4.1V under a memory cap that
emulates a smaller card, in the precision the issue names for it, with agents at the
phone agent's full context.

Each case runs in a process of its own (`torch.cuda.set_per_process_memory_fraction` caps
the caching allocator of one process; a fresh process starts from nothing): the plan for
one card of that size (`inference_svc/model/sizing`, as `autoglm-plan` makes it) gives
the KV budget and how many agents of CONTEXT tokens it holds; the service's model class
loads the checkpoint in that precision, and the engine runs that many agents at once,
each a 1080x2400 screenshot and filler text up to CONTEXT - TOKENS prompt tokens, then
TOKENS greedy tokens. Reported per case: the agents the plan holds, how many finished,
errors, the peak (on a GPU the allocator's plus the CUDA context, read from the device;
on the host the process's peak resident size) against the plan's weights + runtime +
activations + KV budget, and one agent's decode tokens/s at a short prompt (the
precisions' speed on the same card).

    on a CUDA host:   python tests/bench/gpu_capped.py        (BENCH_WORKDIR, BENCH_OUT)
    CPU smoke run:    BENCH_DEVICE=cpu python tests/bench/gpu_capped.py   (tiny shape)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from inference_svc.engine.engine import Engine, EngineConfig
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.precision import resolve_precision
from inference_svc.model.sizing.cards import Cards, layout
from inference_svc.model.sizing.model_spec import read_model
from inference_svc.types import ChatMessage, GenerationRequest, ImagePart, TextPart
from tests.bench.harness import bench_out_dir, render_table
from tests.bench.phone_agent import AGENT_MAX_PIXELS
from tests.bench.phone_screens import screenshot_png
from tests.bench.test_glm4v_decode import agent_step, decode_rate, token_times

GIB = 1024**3
# (decoder precision, vision precision, card GiB, agents the issue asks for)
GPU_CASES = [("bf16", "bf16", 24, 2), ("int8", "int8", 16, 4), ("int4", "int8", 10, 2)]
CPU_CASES = [("fp32", "fp32", 4, 2), ("int8", "int8", 2, 2), ("int4", "int8", 2, 2)]
FILLER = "The agent scrolled the settings list and read every entry once more. "


def main() -> None:
    device = os.environ.get("BENCH_DEVICE") or ("cuda:0" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    workdir = Path(os.environ.get("BENCH_WORKDIR") or tempfile.mkdtemp(prefix="capped-"))
    if on_gpu:
        from tests.fixtures.real_glm4v import write_glm4v_9b_shape_checkpoint

        checkpoint = write_glm4v_9b_shape_checkpoint(workdir / "glm4v-9b", device=device)
    else:
        from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

        checkpoint = write_tiny_phone_glm4v_checkpoint(workdir / "glm4v-phone")
    results = []
    for case in GPU_CASES if on_gpu else CPU_CASES:
        run = subprocess.run([sys.executable, __file__, device, str(checkpoint), *map(str, case)],
                             capture_output=True, text=True, timeout=600)
        lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else
                       {"case": list(case), "error": run.stderr[-2000:]})
        print(json.dumps(results[-1]), flush=True)
    report(results)


def one_case(device: str, checkpoint: Path, decoder: str, vision: str, card_gib: int,
             asked: int) -> dict:
    on_gpu = device.startswith("cuda")
    full = "bf16" if on_gpu else "fp32"
    if on_gpu:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(card_gib * GIB / total, device)
    spec = read_model(checkpoint, full=full)
    context = min(25_480, spec.context)
    tokens = 64 if on_gpu else 8
    plan = layout(spec, Cards(1 if on_gpu else 0, card_gib * GIB), decoder, vision)
    card = plan.cards[0]
    planned_use = card.memory_bytes - card.reserve_bytes - card.free_bytes + plan.kv_budget_bytes
    result = {"case": [decoder, vision, card_gib, asked], "plan_agents": plan.agents(context),
              "context": context, "planned_use_gib": round(planned_use / GIB, 2)}
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = Glm4vModel(checkpoint, device=device, dtype=dtype,
                       decoder_weights=resolve_precision("--decoder-weights", decoder, dtype,
                                                         [device]),
                       vision_weights=resolve_precision("--vision-weights", vision, dtype,
                                                        [device]))
    agents = max(1, min(asked, plan.agents(context)))
    engine = Engine(model, EngineConfig(max_pixels=AGENT_MAX_PIXELS, prefix_caching=False,
                                        max_batch=agents, kv_budget_bytes=plan.kv_budget_bytes))
    engine.start()
    try:
        steps = [long_step(model, f"a{i}", i, context - tokens, tokens) for i in range(agents)]
        started = time.perf_counter()
        streams = asyncio.run(_all(engine, [request for request, _ in steps]))
        result.update(agents=agents, seconds=round(time.perf_counter() - started, 1),
                      finished=sum(len(s) == tokens for s in streams),
                      prompt_tokens=[length for _, length in steps])
        [alone] = asyncio.run(_all(engine, [agent_step("solo", 99, tokens=tokens)]))
        result["decode_tok_s_1"] = round(decode_rate([alone]), 1)
    except Exception as error:  # the case's finding, not the script's end
        result["error"] = f"{type(error).__name__}: {error}"[:2000]
    finally:
        engine.stop()
    if on_gpu:
        free, total = torch.cuda.mem_get_info(device)
        context_bytes = (total - free) - torch.cuda.memory_reserved(device)
        peak = torch.cuda.max_memory_reserved(device) + context_bytes
    else:  # the process's peak resident size, loading included
        status = Path("/proc/self/status").read_text().splitlines()
        peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    result.update(peak_gib=round(peak / GIB, 2), peak_vs_plan=round(peak / planned_use, 3))
    return result


def long_step(model: Glm4vModel, name: str, seed: int, prompt_tokens: int,
              tokens: int) -> tuple[GenerationRequest, int]:
    """A phone step of at most `prompt_tokens` (its screenshot and filler text), and its
    prompt's length."""
    screen = ImagePart(screenshot_png(seed), "image/png", "messages[0].parts[0].image")
    sampling = agent_step(name, seed, tokens=tokens).sampling  # the agent's own

    def request(repeats: int) -> GenerationRequest:
        return GenerationRequest(name, [ChatMessage("user", [
            screen, TextPart(FILLER * repeats + f"Agent {name}: tap the calendar.")])],
            sampling)

    def length(repeats: int) -> int:
        messages = request(repeats).messages
        media = model.decode_media(messages, max_pixels=AGENT_MAX_PIXELS)
        return len(model.plan(messages, media, enable_thinking=False).input_ids)

    base, per = length(0), (length(20) - length(0)) / 20
    repeats = max(0, int((prompt_tokens - base) / per) - 1)
    return request(repeats), length(repeats)


async def _all(engine: Engine, requests: list[GenerationRequest]) -> list[list[float]]:
    return await asyncio.gather(*(token_times(engine, r) for r in requests))


def report(results: list[dict]) -> None:
    rows = [[" / ".join(map(str, r["case"][:2])), f"{r['case'][2]} GiB", str(r["case"][3]),
             str(r.get("plan_agents", "-")), str(r.get("finished", "-")),
             str(r.get("peak_gib", "-")), str(r.get("planned_use_gib", "-")),
             str(r.get("peak_vs_plan", "-")), str(r.get("decode_tok_s_1", "-")),
             (r.get("error") or "")[:60]] for r in results]
    print(render_table(["decoder / vision", "card", "asked", "plan holds", "finished",
                        "peak GiB", "plan GiB", "peak / plan", "1-agent tok/s", "error"], rows))
    path = bench_out_dir() / "gpu_capped.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"numbers written to {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2:
        device, checkpoint, decoder, vision, gib, asked = sys.argv[1:]
        print(json.dumps(one_case(device, Path(checkpoint), decoder, vision, int(gib),
                                  int(asked))))
    else:
        main()
