"""GPU throughput: autoglm-serve against `transformers serve --continuous-batching`, one card.

Issue 10's GPU item: a random-weight Qwen2.5-0.5B-shaped decoder (hidden 896, 24 layers,
14 heads, 2 KV heads, MLP 4864, vocab 151,936, tied embeddings) in bfloat16 is written as a
modular bundle with only a decoder; both servers load it on the same card; greedy streams
of exactly N new tokens run at 1, 2, 4, 8, 16 and 32 concurrent streams, the two sides
taking turns (which goes first alternates every round). Printed: aggregate tokens/s per
side and ours/theirs, and single-stream decode speed as a fraction of the memory-bandwidth
bound (weight bytes read per token / bytes per second a device copy moves).

Equal lengths: our side gets min_new_tokens = max_new_tokens. transformers' CB manager
takes only max_new_tokens and eos per request, so the decoder is built so that greedy
decoding never picks a special token: the embedding rows (tied to the LM head) of every
added/special token and of every id past the tokenizer's vocabulary are zero, their
logits 0 while the best of ~49k random logits is far above 0. The tokenizer is SmolLM2's
(the embedded default's, 49,152 ids, a subset of the 151,936 rows).

Run from the repository root with PYTHONPATH=$PWD:$PWD/clients/python (after
`python protos/generate.py`):
  on a CUDA host:     python tests/bench/gpu_throughput.py
  CPU smoke run:      BENCH_DEVICE=cpu python tests/bench/gpu_throughput.py   (tiny shape)
pytest (CUDA only):   pytest tests/bench/test_gpu_throughput.py -m bench -s

Environment (all optional):
  BENCH_DEVICE          cuda:0 (default when CUDA exists) or cpu
  BENCH_SHAPE           qwen2.5-0.5b (default on CUDA) or tiny (default on CPU)
  BENCH_DTYPE           bfloat16 on CUDA, float32 on CPU
  BENCH_LEVELS          1,2,4,8,16,32 on CUDA; 1,2,4 on CPU
  BENCH_NEW_TOKENS      128 on CUDA, 16 on CPU
  BENCH_REPEATS         rounds per level (2 on CUDA, 1 on CPU)
  BENCH_DEADLINE_S      start no new level after this many seconds (0: none)
  BENCH_TOKENIZER_DIR   a SmolLM2 tokenizer directory (default: the embedded default's)
  BENCH_SERVER_ARGS     extra autoglm-server flags (shell-split)
  BENCH_TF_ARGS         extra `transformers serve` flags (shell-split)
  BENCH_TF_LAUNCH       how to start it, tried in order: cli (`transformers serve`), api
                        (`Serve(...)` in Python, the same server without the CLI); cli,api
  BENCH_TF_ATTN         attention implementation for transformers serve (default sdpa:
                        its CB turns it into the paged sdpa path)
  BENCH_WORKDIR         where the bundle and server logs go (default: a temp dir)
  BENCH_OUT, else OUT   folder for gpu_throughput.json (written after every level)
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import httpx
from google.protobuf import json_format

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import (
    Sampling,
    StreamResult,
    median,
    percentile,
    render_table,
    repeats,
    samples,
    unique_tag,
)
from tests.bench.openai_server import OpenAIServer, free_port
from tests.bench.prompts import single_turn
from tests.bench.streams import grpc_generate, openai_generate
from tests.conftest import REPO, ServerProcess, start_server, wait_until_serving

OURS = "autoglm-serve"
THEIRS = "transformers serve --continuous-batching"
RESULT_NAME = "gpu_throughput"

SHAPES: dict[str, dict] = {
    # Qwen2.5-0.5B's published config, written out by hand (no hub here)
    "qwen2.5-0.5b": {
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
    # the same architecture and vocabulary, small enough for a 2-core CPU smoke run
    "tiny": {
        "vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


@dataclass(frozen=True)
class Plan:
    """What one run measures; read from the environment once, at the start."""

    device: str
    shape: str
    dtype: str
    levels: list[int]
    new_tokens: int
    rounds: int
    deadline_s: float
    server_args: list[str]
    tf_args: list[str]
    tf_attn: str
    workdir: Path | None
    out_dir: Path

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @classmethod
    def from_env(cls) -> Plan:
        import torch

        default_device = "cuda:0" if torch.cuda.is_available() else "cpu"
        device = _env("BENCH_DEVICE", default_device)
        cuda = device.startswith("cuda")
        levels = [int(v) for v in _env("BENCH_LEVELS", "1,2,4,8,16,32" if cuda else "1,2,4")
                  .split(",") if v.strip()]
        out = os.environ.get("BENCH_OUT") or os.environ.get("OUT") or str(
            Path(tempfile.gettempdir()) / "autoglm-bench")
        workdir = os.environ.get("BENCH_WORKDIR")
        plan = cls(
            device=device,
            shape=_env("BENCH_SHAPE", "qwen2.5-0.5b" if cuda else "tiny"),
            dtype=_env("BENCH_DTYPE", "bfloat16" if cuda else "float32"),
            levels=sorted(set(levels)),
            new_tokens=int(_env("BENCH_NEW_TOKENS", "128" if cuda else "16")),
            rounds=repeats(2 if cuda else 1),
            deadline_s=float(_env("BENCH_DEADLINE_S", "0")),
            server_args=shlex.split(os.environ.get("BENCH_SERVER_ARGS", "")),
            tf_args=shlex.split(os.environ.get("BENCH_TF_ARGS", "")),
            tf_attn=_env("BENCH_TF_ATTN", "sdpa"),
            workdir=Path(workdir) if workdir else None,
            out_dir=Path(out),
        )
        if plan.shape not in SHAPES:
            raise ValueError(f"BENCH_SHAPE {plan.shape!r}: one of {sorted(SHAPES)}")
        if not plan.levels or min(plan.levels) < 1 or plan.new_tokens < 2:
            raise ValueError("BENCH_LEVELS needs positive levels and BENCH_NEW_TOKENS >= 2")
        return plan


# ---- the decoder -------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    shape: str
    dtype: str
    parameters: int  # tied embeddings counted once
    weight_bytes: int  # what one decode step reads at least once
    vocab_size: int
    tokenizer_size: int
    silenced_ids: int  # rows zeroed so greedy decoding never picks them
    build_s: float


def find_tokenizer_dir() -> Path:
    """A SmolLM2 tokenizer: BENCH_TOKENIZER_DIR, .gpu/tokenizer, or the embedded default's."""
    named = os.environ.get("BENCH_TOKENIZER_DIR")
    if named:
        return Path(named)
    carried = REPO / ".gpu" / "tokenizer"
    if (carried / "tokenizer.json").is_file():
        return carried
    from inference_svc.model.checkpoints.default_bundle import (
        DEFAULT_BUNDLE_NAME,
        default_cache_dir,
    )

    cached = default_cache_dir() / DEFAULT_BUNDLE_NAME / "decoder"
    if (cached / "tokenizer.json").is_file():
        return cached
    from inference_svc.model.checkpoints.default_bundle import ensure_default_bundle

    return ensure_default_bundle() / "decoder"


def build_bundle(out: Path, plan: Plan, tokenizer_dir: Path) -> ModelFacts:
    """Write a modular bundle whose only module is a random decoder of `plan.shape`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Config

    from inference_svc.model.checkpoints.bundle import Manifest, ModuleEntry

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    shape = SHAPES[plan.shape]
    if len(tokenizer) > shape["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, more than the shape's vocabulary")
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    config = Qwen2Config(**shape, **special)
    dtype = getattr(torch, plan.dtype)
    torch.manual_seed(0)
    with torch.device(plan.device):  # initialise where it will run: seconds, not minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    silenced = sorted(set(tokenizer.added_tokens_decoder) | set(tokenizer.all_special_ids)
                      | set(range(len(tokenizer), config.vocab_size)))
    with torch.no_grad():
        model.get_input_embeddings().weight[silenced] = 0
    model.generation_config = GenerationConfig(**special)
    decoder = out / "decoder"
    model.save_pretrained(decoder)
    tokenizer.save_pretrained(decoder)
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    if plan.on_cuda:
        torch.cuda.empty_cache()
    facts = ModelFacts(plan.shape, plan.dtype, parameters, weight_bytes, config.vocab_size,
                       len(tokenizer), len(silenced), time.perf_counter() - started)
    Manifest(
        name=f"random {plan.shape} decoder ({plan.dtype}) for the GPU throughput benchmark",
        modules={"decoder": ModuleEntry("decoder", False,
                                        f"{plan.shape} shape, seeded random weights")},
        details={"tokenizer": str(tokenizer_dir)},
    ).write(out)
    return facts


def copy_bandwidth(device: str, nbytes: int, copies: int) -> float:
    """Bytes per second one tensor copy moves on `device`, counting bytes read and written."""
    import torch

    cuda = device.startswith("cuda")
    source = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(3):
        target.copy_(source)
    sync()
    started = time.perf_counter()
    for _ in range(copies):
        target.copy_(source)
    sync()
    elapsed = time.perf_counter() - started
    del source, target
    if cuda:
        torch.cuda.empty_cache()
    return 2 * nbytes * copies / elapsed


# ---- the two servers ---------------------------------------------------------------

def start_ours(plan: Plan, bundle: Path, workdir: Path) -> ServerProcess:
    """autoglm-server on the bundle; returns at once (`wait_ours` waits for SERVING), so
    that both servers load at the same time."""
    args = ["--device", plan.device, "--dtype", plan.dtype,
            "--max-batch", str(max(max(plan.levels), 16)), "--kv-budget-mb", "4096",
            "--watchdog-timeout", "0", *plan.server_args]
    return start_server(workdir, bundle, *args, wait=False)


def wait_ours(server: ServerProcess, workdir: Path, timeout: float = 600.0) -> None:
    wait_until_serving(server, workdir / "port.json", timeout)


_SERVE_BY_API = """
import sys, json
from transformers.cli.serve import Serve
Serve(**json.loads(sys.argv[1]))
"""


def start_theirs(plan: Plan, decoder_dir: Path, workdir: Path,
                 timeout: float = 600.0) -> tuple[OpenAIServer, str]:
    """`transformers serve DIR --continuous-batching` on the plan's device and dtype.

    Through its CLI first; if that process dies before answering (a CLI dependency of
    another version on the host, say), through `Serve(...)` itself, the same server code.
    Returns the server and which way started it.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    options: dict = {
        "continuous_batching": True, "attn_implementation": plan.tf_attn,
        "device": plan.device, "dtype": plan.dtype, "log_level": "warning",
        "host": "127.0.0.1",
    }
    if plan.on_cuda:  # its KV pool is sized from this process's view of free memory only
        options["cb_max_memory_percent"] = 0.3
    flags = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    failures = []
    for launcher in _env("BENCH_TF_LAUNCH", "cli,api").split(","):
        port = free_port()
        if launcher == "cli":
            command = [sys.executable, "-m", "transformers.cli.transformers", "serve",
                       str(decoder_dir), *flags, "--port", str(port), *plan.tf_args]
        elif launcher == "api":
            command = [sys.executable, "-c", _SERVE_BY_API, json.dumps(
                {**options, "force_model": str(decoder_dir), "port": port})]
        else:
            raise ValueError(f"BENCH_TF_LAUNCH: {launcher!r} is not cli or api")
        log_path = workdir / f"transformers-serve-{launcher}.log"
        process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
        server = OpenAIServer(process, f"http://127.0.0.1:{port}", str(decoder_dir), log_path)
        if _wait_healthy(server, timeout):
            return server, launcher
        server.terminate()
        failures.append(f"--- {launcher}:\n{log_path.read_text(errors='replace')[-3000:]}")
    raise RuntimeError("transformers serve did not start:\n" + "\n".join(failures))


def _wait_healthy(server: OpenAIServer, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            return False
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


# ---- measuring ---------------------------------------------------------------------

@dataclass
class Side:
    """One server as the benchmark drives it: send conversations, get their streams."""

    name: str
    runs: dict[int, list[tuple[float, list[StreamResult]]]] = field(default_factory=dict)
    short: list[StreamResult] = field(default_factory=list)  # one stream, few tokens

    async def generate(self, conversations: list[list[dict[str, str]]],
                       new_tokens: int) -> list[StreamResult]:
        raise NotImplementedError

    def aggregate(self, level: int) -> float:
        """Median over rounds of all streams' tokens / the round's wall time."""
        return median([sum(s.completion_tokens for s in streams) / wall
                       for wall, streams in self.runs[level]])

    def streams(self, level: int) -> list[StreamResult]:
        return [s for _, streams in self.runs[level] for s in streams]

    def decode_rate(self) -> float | None:
        """One stream's decode tokens/s as (long - short tokens) / (long - short time):
        prefill, queueing and how the server groups tokens into messages cancel out."""
        if 1 not in self.runs or not self.short:
            return None
        long = self.streams(1)
        tokens = (median([s.completion_tokens for s in long])
                  - median([s.completion_tokens for s in self.short]))
        seconds = median([s.total_s for s in long]) - median([s.total_s for s in self.short])
        return tokens / seconds if tokens > 0 and seconds > 0 else None


class GrpcSide(Side):
    def __init__(self, stub: pb_grpc.InferenceServiceStub) -> None:
        super().__init__(OURS)
        self.stub = stub

    async def generate(self, conversations, new_tokens):
        sampling = Sampling(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0,
                            repetition_penalty=1.0)
        return list(await asyncio.gather(*(grpc_generate(self.stub, c, sampling)
                                           for c in conversations)))


class OpenAISide(Side):
    def __init__(self, client: httpx.AsyncClient, model: str, generation: dict) -> None:
        super().__init__(THEIRS)
        self.client = client
        self.model = model
        self.generation = generation

    async def generate(self, conversations, new_tokens):
        config = {**self.generation, "max_new_tokens": new_tokens, "do_sample": False}
        bodies = [{"model": self.model, "messages": c, "stream": True,
                   "stream_options": {"include_usage": True}, "max_tokens": new_tokens,
                   "temperature": 0.0, "generation_config": json.dumps(config)}
                  for c in conversations]
        return list(await asyncio.gather(*(openai_generate(self.client, b) for b in bodies)))


def short_tokens(plan: Plan) -> int:
    return max(1, plan.new_tokens // 8)


async def measure(plan: Plan, sides: list[Side], on_level: Callable[[int], None]) -> list[int]:
    """Warm each level on both sides, then `plan.rounds` timed rounds whose first side
    alternates; at one stream each round also times a short stream per side."""
    started = time.monotonic()
    done: list[int] = []
    for level in plan.levels:
        if plan.deadline_s and time.monotonic() - started > plan.deadline_s:
            print(f"[gpu_throughput] deadline: levels from {level} on are skipped", flush=True)
            break
        for side in sides:  # allocations, graphs and kernels for this batch size
            await side.generate([single_turn(unique_tag()) for _ in range(level)], 8)
        for round_index in range(plan.rounds):
            conversations = [single_turn(unique_tag()) for _ in range(level)]
            order = sides if round_index % 2 == 0 else sides[::-1]
            for side in order:
                began = time.perf_counter()
                streams = await side.generate(conversations, plan.new_tokens)
                wall = time.perf_counter() - began
                side.runs.setdefault(level, []).append((wall, streams))
                if level == 1:
                    side.short += await side.generate(conversations, short_tokens(plan))
        done.append(level)
        on_level(level)
    return done


# ---- reporting ---------------------------------------------------------------------

HEADERS = ["streams", "ours tok/s", "theirs tok/s", "ours/theirs", "ours tok/s/stream",
           "theirs tok/s/stream", "ours TTFT p50 ms", "theirs TTFT p50 ms", "ours tokens",
           "theirs tokens"]


def level_row(ours: Side, theirs: Side, level: int) -> list[str]:
    a, b = ours.aggregate(level), theirs.aggregate(level)

    def per_stream(side: Side) -> str:
        return f"{median([s.tokens_per_s for s in side.streams(level)]):.1f}"

    def ttft(side: Side) -> str:
        return f"{percentile([s.ttft_s for s in side.streams(level)], 50) * 1000:.0f}"

    def lengths(side: Side) -> str:
        tokens = [s.completion_tokens for s in side.streams(level)]
        return f"{min(tokens)}-{max(tokens)}"

    return [str(level), f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}", per_stream(ours),
            per_stream(theirs), ttft(ours), ttft(theirs), lengths(ours), lengths(theirs)]


def bandwidth_lines(facts: ModelFacts, bandwidth: float,
                    sides: list[Side]) -> tuple[list[str], dict]:
    """Single-stream decode against weight bytes per token / measured copy bandwidth."""
    bound = bandwidth / facts.weight_bytes
    lines = [f"bandwidth bound: {facts.weight_bytes / 1e6:.0f} MB of weights per token / "
             f"{bandwidth / 1e12:.3f} TB/s copy (read + write) = {bound:.0f} tok/s "
             f"({1000 / bound:.3f} ms/token)"]
    data: dict = {"bound_tokens_per_s": bound, "copy_bytes_per_s": bandwidth,
                  "weight_bytes": facts.weight_bytes}
    for side in sides:
        decode = side.decode_rate()
        if decode is None:
            lines.append(f"{side.name}: no single-stream decode rate (level 1 not measured)")
            continue
        lines.append(f"{side.name}: one stream decodes {decode:.1f} tok/s "
                     f"({1000 / decode:.2f} ms/token) = {decode / bound:.1%} of the bound")
        data[side.name] = {"decode_tokens_per_s": decode, "fraction_of_bound": decode / bound,
                           "short_streams": samples(side.short)}
    return lines, data


def write_json(plan: Plan, payload: dict) -> Path:
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    path = plan.out_dir / f"{RESULT_NAME}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def environment(plan: Plan) -> dict:
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "device": plan.device}
    if plan.on_cuda:
        props = torch.cuda.get_device_properties(torch.device(plan.device))
        info |= {"gpu": props.name, "gpu_memory_bytes": props.total_memory}
    return info


# ---- the run -----------------------------------------------------------------------

async def run(plan: Plan, workdir: Path) -> dict:
    """Build, start both servers, measure, print the table; return the JSON payload."""
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    env = environment(plan)
    print(f"[gpu_throughput] {json.dumps(env)}; plan: levels {plan.levels}, "
          f"{plan.new_tokens} tokens/stream, {plan.rounds} round(s)", flush=True)
    tokenizer_dir = find_tokenizer_dir()
    bundle = workdir / "bundle"
    facts = build_bundle(bundle, plan, tokenizer_dir)
    print(f"[gpu_throughput] built {facts.shape} ({facts.parameters / 1e6:.1f} M parameters, "
          f"{facts.weight_bytes / 1e6:.0f} MB {facts.dtype}) in {facts.build_s:.1f}s; "
          f"tokenizer {tokenizer_dir} ({facts.tokenizer_size} ids)", flush=True)
    big = 1 << 30 if plan.on_cuda else 1 << 28
    bandwidth = copy_bandwidth(plan.device, big, 20 if plan.on_cuda else 5)
    print(f"[gpu_throughput] copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)", flush=True)
    marks["built"] = time.perf_counter() - t0

    payload: dict = {"benchmark": RESULT_NAME, "environment": env, "plan": asdict(plan),
                     "model": asdict(facts), "headers": HEADERS, "rows": [], "marks": marks}
    ours_server = start_ours(plan, bundle, workdir / "ours")
    theirs_server = None
    try:
        theirs_server, launcher = start_theirs(plan, bundle / "decoder", workdir / "theirs")
        marks["theirs_serving"] = time.perf_counter() - t0
        wait_ours(ours_server, workdir / "ours")
        marks["ours_serving"] = time.perf_counter() - t0
        payload["transformers_serve_launcher"] = launcher
        print(f"[gpu_throughput] servers up after {time.perf_counter() - t0:.0f}s "
              f"(transformers serve via its {launcher})", flush=True)
        generation = json.loads((bundle / "decoder" / "generation_config.json").read_text())
        generation = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if k in generation}
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with (
            grpc.aio.insecure_channel(ours_server.target) as channel,
            httpx.AsyncClient(base_url=theirs_server.base_url, timeout=900,
                              limits=limits) as client,
        ):
            stub = pb_grpc.InferenceServiceStub(channel)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            described = json_format.MessageToDict(info)
            payload["ours_model_info"] = described
            placed = [f"{m.name} on {m.device}" for m in info.modules]
            print(f"[gpu_throughput] {OURS} serves {', '.join(placed)}, "
                  f"dtype {described.get('details', {}).get('dtype', '?')}", flush=True)
            ours = GrpcSide(stub)
            theirs = OpenAISide(client, theirs_server.model, generation)
            sides: list[Side] = [ours, theirs]

            def on_level(level: int) -> None:
                row = level_row(ours, theirs, level)
                payload["rows"].append(row)
                payload.setdefault("runs", {})[str(level)] = {
                    side.name: [{"wall_s": wall, "streams": samples(streams)}
                                for wall, streams in side.runs[level]] for side in sides}
                marks[f"level_{level}"] = time.perf_counter() - t0
                print(f"[gpu_throughput] {dict(zip(HEADERS, row, strict=True))}", flush=True)
                write_json(plan, payload)

            try:
                await measure(plan, sides, on_level)
            except Exception as exc:  # keep what was measured; the table says what failed
                traceback.print_exc()
                payload["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    finally:
        ours_server.terminate()
        if theirs_server is not None:
            theirs_server.terminate()

    lines, bound = bandwidth_lines(facts, bandwidth, sides)
    short = sum(1 for side in sides for level in side.runs for s in side.streams(level)
                if s.completion_tokens != plan.new_tokens)
    lines.append(f"streams not exactly {plan.new_tokens} tokens: {short}")
    if "error" in payload:
        lines.append(f"stopped early by {payload['error'][:500]}")
    payload["bandwidth"] = bound
    payload["notes"] = lines
    marks["total"] = time.perf_counter() - t0
    card = env.get("gpu", plan.device)
    title = (f"GPU throughput: random {facts.shape} {facts.dtype} on {card}, "
             f"greedy, {plan.new_tokens} new tokens per stream, median of {plan.rounds} "
             f"alternating round(s); ours = {OURS} (gRPC), theirs = {THEIRS} "
             f"(attn {plan.tf_attn})")
    print(f"\n{title}\n{render_table(HEADERS, payload['rows'])}")
    for line in lines:
        print(line)
    path = write_json(plan, payload | {"title": title})
    print(f"numbers written to {path} ({marks['total']:.0f}s in all)", flush=True)
    return payload


def main() -> int:
    plan = Plan.from_env()
    if plan.on_cuda:
        import torch

        if not torch.cuda.is_available():
            print("gpu_throughput: no CUDA device (BENCH_DEVICE=cpu runs the CPU smoke version)")
            return 2
    if plan.workdir is not None:
        plan.workdir.mkdir(parents=True, exist_ok=True)
        payload = asyncio.run(run(plan, plan.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="gpubench-") as tmp:
            payload = asyncio.run(run(plan, Path(tmp)))
    return 1 if "error" in payload or not payload["rows"] else 0


if __name__ == "__main__":
    sys.exit(main())
