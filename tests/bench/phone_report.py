"""The phone-agent replay's tables: one row per configuration, one per step of each."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tests.bench.harness import (
    bench_out_dir,
    markdown_table,
    median,
    percentile,
    render_table,
    report,
)

if TYPE_CHECKING:
    from tests.bench.phone_agent import Measured, Replay, Step

MIB = 1024 * 1024
SUMMARY = ["model", "K", "steps", "TTFT p50 ms", "TTFT p95 ms", "prompt tok/step",
           "image tok/step", "cached tok/step", "min cached/reusable", "KV MiB/session",
           "peak RSS MiB", "tok/s", "decode tok/s"]
PER_STEP = ["model", "K", "step", "TTFT p50 ms", "prompt tok", "image tok", "cached tok",
            "reusable tok", "min cached/reusable"]


def write_report(results: list[Measured], replay: Replay, *, max_pixels: int) -> Path:
    """Print both tables; write them with every step's numbers as JSON and markdown."""
    title = (f"phone agent replay: K sessions x {replay.steps} steps, streamed through the "
             f"gateway; a 1080x2400 PNG per step at --max-pixels {max_pixels}; "
             + ", ".join(f"{k} {v}" for k, v in replay.sampling.items()))
    summary = [summary_row(r) for r in results]
    per_step = [step_row(r, n) for r in results for n in range(1, replay.steps + 1)]
    notes = ["", "per step (mean over the K sessions; reusable: prompt tokens before the "
             "previous user turn, whose image the agent removed)", render_table(PER_STEP, per_step)]
    path = report("phone_agent", title, SUMMARY, summary,
                  {"steps": replay.steps, "sampling": replay.sampling, "max_pixels": max_pixels,
                   "configurations": [r.as_json() for r in results]}, notes)
    markdown = [f"# {title}", "", markdown_table(SUMMARY, summary), "", notes[1], "",
                markdown_table(PER_STEP, per_step), ""]
    (bench_out_dir() / "phone_agent.md").write_text("\n".join(markdown))
    return path


def summary_row(result: Measured) -> list[str]:
    steps = result.steps
    ttfts = [s.stream.ttft_s for s in steps]
    kv = [entry["bytes"] for entry in result.session_kv.values()]
    return [result.model, str(result.agents), str(len(steps) // result.agents),
            _ms(percentile(ttfts, 50)), _ms(percentile(ttfts, 95)),
            _mean(s.stream.prompt_tokens for s in steps), _mean(s.image_tokens for s in steps),
            _mean(s.stream.cached_prompt_tokens for s in steps), _least_reuse(steps),
            f"{sum(kv) / max(len(kv), 1) / MIB:.2f}", f"{result.peak_rss_bytes / MIB:.0f}",
            f"{result.tokens_per_s:.1f}", f"{decode_rate(result):.1f}"]


def decode_rate(result: Measured) -> float:
    """Aggregate decode tokens/s: at each step number, the K sessions' rates after their
    first token, summed (they decode side by side); the median over step numbers."""
    numbers = sorted({s.step for s in result.steps})
    return median([sum(s.stream.decode_tokens_per_s for s in result.steps if s.step == n)
                   for n in numbers])


def step_row(result: Measured, number: int) -> list[str]:
    steps = [s for s in result.steps if s.step == number]
    return [result.model, str(result.agents), str(number),
            _ms(percentile([s.stream.ttft_s for s in steps], 50)),
            _mean(s.stream.prompt_tokens for s in steps), _mean(s.image_tokens for s in steps),
            _mean(s.stream.cached_prompt_tokens for s in steps),
            _mean(s.reusable_tokens for s in steps), _least_reuse(steps)]


def reuse(step: Step) -> float | None:
    """Cached / reusable prompt tokens; None on a first step (nothing is reusable)."""
    if not step.reusable_tokens:
        return None
    return step.stream.cached_prompt_tokens / step.reusable_tokens


def _least_reuse(steps: list[Step]) -> str:
    ratios = [r for r in map(reuse, steps) if r is not None]
    return f"{min(ratios):.2f}" if ratios else "-"


def _mean(values) -> str:
    values = list(values)
    return f"{sum(values) / len(values):.0f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"
