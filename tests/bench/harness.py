"""What every benchmark shares: sampling settings, one stream's timings, statistics, output.

Each benchmark prints one plain-text comparison table and writes its raw samples and
summary as JSON to $BENCH_OUT (default: a folder in the system temp dir).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

_tags = itertools.count()


@dataclass(frozen=True)
class Sampling:
    """The same settings on every side; min = max new tokens so lengths match."""

    max_new_tokens: int
    temperature: float = 0.7
    top_p: float = 0.9
    repetition_penalty: float = 1.2

    @classmethod
    def named(cls, name: str, max_new_tokens: int) -> Sampling:
        """"reference": the reference article's settings; "greedy": argmax, no penalty."""
        if name == "greedy":
            return cls(max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0)
        return cls(max_new_tokens)

    def generate_kwargs(self) -> dict:
        """Keyword arguments of transformers' generate() for these settings."""
        if self.temperature <= 0:  # greedy
            return {"max_new_tokens": self.max_new_tokens,
                    "min_new_tokens": self.max_new_tokens, "do_sample": False,
                    "repetition_penalty": self.repetition_penalty}
        return {
            "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.max_new_tokens,
            "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
        }


@dataclass
class StreamResult:
    """One generation as its client saw it; times in seconds from sending the request."""

    ttft_s: float
    total_s: float
    completion_tokens: int
    prompt_tokens: int
    cached_prompt_tokens: int = 0
    text: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.total_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Rate after the first token: excludes prefill and queueing."""
        return (self.completion_tokens - 1) / max(self.total_s - self.ttft_s, 1e-9)


def median(values: list[float]) -> float:
    return float(np.median(values))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def repeats(default: int) -> int:
    """Repetitions per measured point; BENCH_REPEATS overrides the benchmark's default."""
    return max(1, int(os.environ.get("BENCH_REPEATS", default)))


def unique_tag() -> str:
    """A marker put first in a prompt so no earlier request's cached prefix matches it."""
    return f"[run {os.getpid()}-{time.monotonic_ns() % 10**9}-{next(_tags)}]"


def print_load(benchmark: str) -> tuple[float, float, float]:
    import torch

    load = os.getloadavg()
    print(f"\n[{benchmark}] load average before measuring: "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores; "
          f"torch threads {torch.get_num_threads()}")
    return load


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text columns: the first left-aligned, the rest right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        first, *rest = (str(c) for c in cells)
        parts = [first.ljust(widths[0])]
        parts += [cell.rjust(width) for cell, width in zip(rest, widths[1:], strict=True)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """The same table as GitHub markdown: the first column left-aligned, the rest right."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    rule = "|" + "|".join([":--", *["--:"] * (len(headers) - 1)]) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def bench_out_dir() -> Path:
    folder = Path(os.environ.get("BENCH_OUT") or Path(tempfile.gettempdir()) / "autoglm-bench")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def report(name: str, title: str, headers: list[str], rows: list[list[str]],
           data: dict, notes: list[str] = ()) -> Path:
    """Print the comparison table (and notes under it); write `data` as JSON."""
    print(f"\n{title}\n{render_table(headers, rows)}")
    for note in notes:
        print(note)
    path = bench_out_dir() / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "title": title, "headers": headers,
                                "rows": rows, "notes": list(notes), **data}, indent=2))
    print(f"numbers written to {path}")
    return path


def samples(results: list[StreamResult]) -> list[dict]:
    return [{k: v for k, v in asdict(r).items() if k != "text"} for r in results]
