"""autoglm-plan: which weight precisions, KV budget, longest context and how many phone
agents at once fit a checkpoint onto cards of a given size, from its config files and
safetensors headers alone (no weights are loaded, so it runs on a CPU in seconds).

    autoglm-plan [CHECKPOINT] --gpu-memory-gib 24 [--gpus 2] [--context 25480] [--agents K]
                 [--fp8] [--dtype auto] [--reserve-fraction 0.08] [--screenshot 1080x2400]
                 [--max-pixels N] [--json | --env]
    autoglm-plan [CHECKPOINT] --table

CHECKPOINT is a native GLM-4.1V checkpoint (a config.json alone will do) or a modular
bundle; without it, the embedded default bundle. When nothing fits it says why on stderr
and exits 2. `--env` prints the chosen precisions and KV budget as the service's
environment (AUTOGLM_DECODER_WEIGHTS, AUTOGLM_VISION_WEIGHTS, AUTOGLM_KV_BUDGET_MB,
AUTOGLM_DEVICE) for
a start script; `--table` prints the plans for 8 to 80 GiB cards, one or two of them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from inference_svc.model.cli.bundle import human_bytes
from inference_svc.model.sizing.cards import (
    GIB,
    RESERVE_FRACTION,
    Cards,
    Layout,
    PlanError,
    choose,
)
from inference_svc.model.sizing.model_spec import ModelSpec, read_model
from inference_svc.model.sizing.weights import DTYPE_PRECISION

PROG = "autoglm-plan"
MIB = 1024**2
AGENT_CONTEXT = 25_480  # the phone agent's full context (Open-AutoGLM's max_model_len)
TABLE_CARDS_GIB = (8, 12, 16, 24, 48, 80)
TABLE_GPUS = (1, 2)


def serving_precision(dtype: str, gpus: int) -> str:
    """The service's own rule for --dtype auto: bf16 on a GPU, fp32 on the CPU."""
    if dtype == "auto":
        return "bf16" if gpus else "fp32"
    return DTYPE_PRECISION[dtype]


def plan_record(spec: ModelSpec, cards: Cards, plan: Layout, *, context: int,
                agents: int) -> dict:
    """The plan as the JSON output's fields."""
    return {
        "model": spec.name, "kind": spec.kind, "weights_source": spec.tensors.source,
        "serving_dtype": spec.full, "gpus": cards.count, "gpu_memory_bytes": cards.memory_bytes,
        "reserve_fraction": cards.reserve_fraction,
        "decoder_weights": plan.decoder, "vision_weights": plan.vision,
        "parameters": spec.tensors.parameters(), "weights_bytes": plan.weights,
        "cards": [{**asdict(c), "kv_tokens": c.kv_tokens} for c in plan.cards],
        "layers": spec.kv.layers, "kv_heads": spec.kv.kv_heads, "head_dim": spec.kv.head_dim,
        "kv_bytes_per_token_per_layer": plan.kv_bytes_per_token // spec.kv.layers,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_budget_bytes": plan.kv_budget_bytes, "kv_capacity_tokens": plan.kv_tokens,
        "model_context": spec.context, "longest_context": min(plan.kv_tokens, spec.context),
        "screenshot": f"{spec.screenshot[0]}x{spec.screenshot[1]}",
        "image_tokens_per_screenshot": spec.image_tokens,
        "vision_activation_bytes": spec.vision_activation_bytes,
        "context": context, "agents": agents,
        "kv_bytes_per_agent": context * plan.kv_bytes_per_token,
        "agents_at_context": plan.agents(context),
    }


def render(r: dict) -> str:
    devices = f"{r['gpus']} x {r['gpu_memory_bytes'] / GIB:g} GiB" if r["gpus"] else \
        f"a host with {r['gpu_memory_bytes'] / GIB:g} GiB"
    lines = [f"{r['model']}  ({r['kind']}, {devices}, serving dtype {r['serving_dtype']})",
             f"weights: decoder {r['decoder_weights']}, vision {r['vision_weights']} "
             f"(parameters from {r['weights_source']})"]
    for name, size in r["weights_bytes"].items():
        lines.append(f"  {name:<8} {r['parameters'][name]:>15,} params  {size:>16,} B"
                     f"  ({human_bytes(size)})")
    lines.append("per card: weights + runtime + vision activations + daemon reserve "
                 "-> left for KV")
    for c in r["cards"]:
        first, stop = c["layers"]
        kv = "no KV" if c["kv_tokens"] is None else \
            f"{c['kv_tokens']:,} tokens at {c['kv_bytes_per_token']:,} B"
        lines.append(
            f"  {c['device']:<7} layers {first}-{stop - 1}: "
            f"{human_bytes(sum(c['weights'].values()))} ({', '.join(c['weights'])}) + "
            f"{human_bytes(c['runtime_bytes'])} + {human_bytes(c['activation_bytes'])} + "
            f"{human_bytes(c['reserve_bytes'])} -> {human_bytes(max(0, c['free_bytes']))}: {kv}")
    element = r["kv_bytes_per_token_per_layer"] // (2 * r["kv_heads"] * r["head_dim"])
    lines += [
        f"KV per token: {r['kv_bytes_per_token_per_layer']:,} B per layer (2 x {r['kv_heads']} "
        f"KV heads x {r['head_dim']} x {element} B) x {r['layers']} layers = "
        f"{r['kv_bytes_per_token']:,} B",
        f"KV budget: {r['kv_budget_bytes']:,} B ({human_bytes(r['kv_budget_bytes'])}) = "
        f"{r['kv_capacity_tokens']:,} tokens",
        f"longest context: {r['longest_context']:,} tokens ("
        + ("the model's own limit)" if r["longest_context"] == r["model_context"]
           else f"the KV budget's; the model's own is {r['model_context']:,})"),
        f"one {r['screenshot']} screenshot: {r['image_tokens_per_screenshot']:,} image tokens, "
        f"{human_bytes(r['vision_activation_bytes'])} of vision activations",
        f"phone agents at {r['context']:,} tokens: {r['agents_at_context']:,} at once "
        f"({human_bytes(r['kv_bytes_per_agent'])} of KV each)",
    ]
    return "\n".join(lines)


def env_lines(r: dict) -> str:
    """The plan as the service's environment; a full-precision module keeps `auto`, and
    a GLM-4.1V checkpoint on several cards has its layers split over them in order as
    planned (a modular bundle's decoder spreads by accelerate: `auto`)."""
    def flag(precision: str) -> str:
        return "auto" if precision == r["serving_dtype"] else precision

    devices = [card["device"] for card in r["cards"]]
    device = devices[0] if len(devices) == 1 else (
        ",".join(devices) if r["kind"] == "glm4v" else "auto")
    return "\n".join([f"AUTOGLM_DECODER_WEIGHTS={flag(r['decoder_weights'])}",
                      f"AUTOGLM_VISION_WEIGHTS={flag(r['vision_weights'])}",
                      f"AUTOGLM_KV_BUDGET_MB={r['kv_budget_bytes'] // MIB}",
                      f"AUTOGLM_DEVICE={device}"])


def table(directory: Path, args: argparse.Namespace) -> str:
    spec = read_model(directory, full=serving_precision(args.dtype, 1),
                      screenshot=args.screenshot, max_pixels=args.max_pixels)
    context = min(AGENT_CONTEXT, spec.context) if args.context is None else args.context
    lines = [f"| card | cards | decoder | vision | weights per card | KV budget | "
             f"longest context | agents at {context:,} |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size in TABLE_CARDS_GIB:
        for gpus in TABLE_GPUS:
            cards = Cards(gpus, size * GIB, args.reserve_fraction)
            try:
                plan = choose(spec, cards, context=context, agents=args.agents, fp8=args.fp8)
            except PlanError:
                lines.append(f"| {size} GiB | {gpus} | does not fit | | | | | |")
                continue
            per_card = " + ".join(f"{sum(c.weights.values()) / GIB:.1f}" for c in plan.cards)
            lines.append(
                f"| {size} GiB | {gpus} | {plan.decoder} | {plan.vision} | {per_card} GiB | "
                f"{plan.kv_budget_bytes / GIB:.1f} GiB | "
                f"{min(plan.kv_tokens, spec.context):,} | {plan.agents(context):,} |")
    return "\n".join(lines)


def screenshot_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT") from None
    return width, height


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, nargs="?", default=None,
                   help="a native GLM-4.1V checkpoint or a modular bundle (default: the "
                        "embedded default bundle)")
    p.add_argument("--gpu-memory-gib", type=float, default=None,
                   help="memory of each GPU (of the host with --gpus 0), GiB")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (0: the host's memory)")
    p.add_argument("--context", type=int, default=None,
                   help=f"tokens one phone-agent session holds at full length (default "
                        f"{AGENT_CONTEXT:,}, or the model's context where shorter)")
    p.add_argument("--agents", type=int, default=1,
                   help="phone-agent sessions that must fit at --context at once")
    p.add_argument("--fp8", action="store_true",
                   help="the cards run float8 (compute capability 8.9+: RTX 4090, L4, H100): "
                        "try a float8 decoder before int8")
    p.add_argument("--dtype", choices=["auto", *DTYPE_PRECISION], default="auto",
                   help="the service's --dtype (auto: bfloat16 on GPUs, float32 on the host)")
    p.add_argument("--reserve-fraction", type=float, default=RESERVE_FRACTION,
                   help="share of each card kept free for the memory daemon (default: above "
                        "its hard mark; 0 without the daemon)")
    p.add_argument("--screenshot", type=screenshot_size, default=(1080, 2400),
                   help="WIDTHxHEIGHT")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="the service's --max-pixels (default: the model's own default)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true")
    out.add_argument("--env", action="store_true",
                     help="print the plan as the service's AUTOGLM_* environment")
    out.add_argument("--table", action="store_true",
                     help="print the plans for 8-80 GiB cards, one or two, as Markdown")
    return p


def check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.gpus < 0 or args.agents < 1 or (args.context is not None and args.context < 1):
        parser.error("--gpus must not be negative; --agents and --context must be positive")
    if not args.table and (args.gpu_memory_gib is None or args.gpu_memory_gib <= 0):
        parser.error("--gpu-memory-gib must be given and positive (or ask for --table)")
    if not 0 <= args.reserve_fraction < 1:
        parser.error("--reserve-fraction must be in [0, 1)")
    if args.fp8 and args.gpus == 0:
        parser.error("--fp8 needs GPUs (--gpus 1 or more)")


def default_checkpoint() -> Path:
    # the server's own: written to the cache on first use
    from inference_svc.model.checkpoints.default_bundle import (
        default_cache_dir,
        ensure_default_bundle,
    )

    return ensure_default_bundle(default_cache_dir())


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    args = parser.parse_args(argv)
    check(parser, args)
    try:
        directory = args.checkpoint or default_checkpoint()
        if args.table:
            out.write(table(directory, args) + "\n")
            return 0
        spec = read_model(directory, full=serving_precision(args.dtype, args.gpus),
                          screenshot=args.screenshot,
                          max_pixels=args.max_pixels)
        context = min(AGENT_CONTEXT, spec.context) if args.context is None else args.context
        cards = Cards(args.gpus, int(args.gpu_memory_gib * GIB), args.reserve_fraction)
        plan = choose(spec, cards, context=context, agents=args.agents, fp8=args.fp8)
    except PlanError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    except (FileNotFoundError, KeyError, ValueError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    record = plan_record(spec, cards, plan, context=context, agents=args.agents)
    if args.json:
        out.write(json.dumps(record, indent=2))
    else:
        out.write(env_lines(record) if args.env else render(record))
    out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
