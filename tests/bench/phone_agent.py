"""The AutoGLM phone agent's workload, replayed against the service through the gateway.

K agent sessions of S steps run at once. Each step is what zai-org/Open-AutoGLM's
`phone_agent/agent.py` and `phone_agent/model/client.py` send: one streamed chat
completion (the `openai` SDK) whose newest user turn is a full-resolution PNG screenshot
as a data URL plus a short JSON screen description; the images of earlier user turns are
removed (their text stays); earlier replies come back as
`<think>...</think><answer>...</answer>`; temperature 0, top_p 0.85, frequency_penalty
0.2, and max_tokens capped (the agent asks for 3000, too many for a CPU). Each session
sends its session id (extra_body `session_id`, which the gateway forwards as the
request's session and as `x-session-id` metadata for affinity), as a deployment would.

Service and gateway run as their own processes on loopback; each configuration (model,
K) gets fresh ones, so caches and the peak memory belong to that configuration alone.
Per step the stream's usage gives prompt, cached and completion tokens; after the
replay, CountTokens gives each step's image tokens and its reusable tokens (the turns
before the previous user turn, whose image the agent removed: everything that a cache
could serve), the control API's memory status gives KV bytes per session and /proc the
service's peak resident memory (VmHWM).

    python -m tests.bench.phone_agent --model glm4v-phone --model default -k 1 -k 4 --steps 3

(run from the repository root with PYTHONPATH=$PWD:$PWD/clients/python; the tables are
printed and written as JSON and markdown to $BENCH_OUT).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import openai
from autoglm_client.control import ControlClient

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from gateway.config import DEFAULT_MODEL_NAME
from gateway.openai_schema import ChatCompletionRequest
from gateway.request_mapping import to_generate_request
from tests.bench.harness import StreamResult, print_load
from tests.bench.openai_server import start_gateway
from tests.bench.phone_report import write_report
from tests.bench.phone_screens import png_data_url, screenshot_png
from tests.bench.prompts import PHONE_AGENT_SYSTEM
from tests.conftest import ServerProcess, start_server
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

MODELS = ("glm4v-phone", "default")
AGENT_MAX_PIXELS = 5_000_000  # Open-AutoGLM's deployment: mm_processor_kwargs max_pixels
TASK = "Open the calendar, move next Tuesday's dentist appointment one hour later"
# What the agent stores when a reply has no action (a random model's text rarely does).
PLACEHOLDER_ACTION = 'do(action="Tap", element=[500,1000])'
ACTION_MARKERS = ("finish(message=", "do(action=")
WARM_UP_SEED = 999_999  # no session's screenshot
_APPS = ("System Home", "Calendar", "Messages", "Settings", "Contacts", "Clock")


# The agent's own sampling (its ModelConfig); only max_tokens is lowered for a CPU.
AGENT_SAMPLING = {"temperature": 0.0, "top_p": 0.85, "frequency_penalty": 0.2}


@dataclass(frozen=True)
class Replay:
    """What every session of one replay does."""

    steps: int
    max_tokens: int = 16

    @property
    def sampling(self) -> dict[str, float]:
        return {"max_tokens": self.max_tokens, **AGENT_SAMPLING}


@dataclass
class Step:
    """One agent step as the agent saw it, and what the service counted for it."""

    session: int
    step: int  # from 1
    stream: StreamResult
    finish_reason: str | None
    image_tokens: int = 0
    reusable_tokens: int = 0  # prompt tokens before the previous user turn (0 on step 1)
    messages: list[dict] = field(default_factory=list, repr=False)  # what was sent


@dataclass
class Measured:
    """One configuration (model, K): its steps and the service's memory after them."""

    model: str
    agents: int
    wall_s: float
    steps: list[Step]
    session_kv: dict[str, dict[str, int]]  # session id -> tokens, bytes
    kv_bytes: int  # all KV in use, a block shared by sessions counted once
    peak_rss_bytes: int

    @property
    def completion_tokens(self) -> int:
        return sum(s.stream.completion_tokens for s in self.steps)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    def as_json(self) -> dict:
        steps = [{"session": s.session, "step": s.step, "finish_reason": s.finish_reason,
                  "image_tokens": s.image_tokens, "reusable_tokens": s.reusable_tokens,
                  **{k: v for k, v in asdict(s.stream).items() if k != "text"}}
                 for s in self.steps]
        return {"model": self.model, "agents": self.agents, "wall_s": self.wall_s,
                "completion_tokens": self.completion_tokens, "tokens_per_s": self.tokens_per_s,
                "session_kv": self.session_kv, "kv_bytes": self.kv_bytes,
                "peak_rss_bytes": self.peak_rss_bytes, "steps": steps}


# ---- the agent ----------------------------------------------------------------------


def user_turn(step: int, screenshot: bytes) -> dict:
    """The agent's user turn: the screenshot first, then the screen description."""
    screen_info = json.dumps({"current_app": _APPS[step % len(_APPS)]}, ensure_ascii=False)
    text = f"{TASK}\n\n{screen_info}" if step == 1 else f"** Screen Info **\n\n{screen_info}"
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url(screenshot)}},
        {"type": "text", "text": text},
    ]}


def assistant_turn(reply: str) -> dict:
    """How the agent stores its reply: the text before the action is the thinking."""
    thinking, action = "", reply.strip() or PLACEHOLDER_ACTION
    for marker in ACTION_MARKERS:
        if marker in reply:
            before, after = reply.split(marker, 1)
            thinking, action = before.strip(), marker + after
            break
    return {"role": "assistant", "content": f"<think>{thinking}</think><answer>{action}</answer>"}


def without_images(turn: dict) -> dict:
    return {**turn, "content": [p for p in turn["content"] if p["type"] == "text"]}


async def agent_step(client: openai.AsyncOpenAI, messages: list[dict], session_id: str | None,
                     replay: Replay) -> tuple[StreamResult, str | None]:
    """One streamed completion; time to first token is the first chunk with text."""
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    usage = finish_reason = None
    stream = await client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, stream=True,
        stream_options={"include_usage": True}, **replay.sampling,
        extra_body={"session_id": session_id} if session_id else None)
    async for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            delta = choice.delta
            if first is None and (delta.content or (delta.model_extra or {}).get(
                    "reasoning_content")):
                first = time.perf_counter()
            pieces.append(delta.content or "")
            finish_reason = choice.finish_reason or finish_reason
    ended = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream carried no usage")
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return StreamResult(ttft_s=(first or ended) - started, total_s=ended - started,
                        completion_tokens=usage.completion_tokens,
                        prompt_tokens=usage.prompt_tokens, cached_prompt_tokens=cached or 0,
                        text="".join(pieces)), finish_reason


async def run_session(client: openai.AsyncOpenAI, session: int, screenshots: list[bytes],
                      replay: Replay) -> list[Step]:
    """PhoneAgent's loop: send, store the reply, strip the image just sent."""
    messages: list[dict] = [{"role": "system", "content": PHONE_AGENT_SYSTEM}]
    steps = []
    for step in range(1, replay.steps + 1):
        messages.append(user_turn(step, screenshots[step - 1]))
        sent = list(messages)
        result, finish_reason = await agent_step(client, sent, f"agent-{session}", replay)
        steps.append(Step(session, step, result, finish_reason, messages=sent))
        messages[-1] = without_images(messages[-1])
        messages.append(assistant_turn(result.text))
    return steps


# ---- one configuration --------------------------------------------------------------


def model_dir(model: str, workdir: Path) -> Path | None:
    """The checkpoint of `model`; None is the service's embedded default."""
    if model == "default":
        return None
    target = workdir / "glm4v-phone"
    return target if target.is_dir() else write_tiny_phone_glm4v_checkpoint(target)


def screenshots_for(agents: int, steps: int) -> list[list[bytes]]:
    """A different screenshot for every session and step (no two share image KV)."""
    return [[screenshot_png(1000 * session + step) for step in range(1, steps + 1)]
            for session in range(agents)]


def benchmark(models: Sequence[str], agents: Sequence[int], replay: Replay, workdir: Path,
              *, max_pixels: int = AGENT_MAX_PIXELS) -> list[Measured]:
    """Every (model, K) in turn; the K-th session's screenshots are the same for every K."""
    screenshots = screenshots_for(max(agents), replay.steps)
    return [measure(model, k, replay, workdir, max_pixels=max_pixels, screenshots=screenshots)
            for model in models for k in sorted(set(agents))]


def measure(model: str, agents: int, replay: Replay, workdir: Path, *,
            max_pixels: int = AGENT_MAX_PIXELS,
            screenshots: list[list[bytes]] | None = None) -> Measured:
    """Start a fresh service and gateway on `model`, replay `agents` sessions, account."""
    run_dir = workdir / f"{model}-k{agents}"
    screenshots = screenshots or screenshots_for(agents, replay.steps)
    server = start_server(run_dir / "service", model_dir(model, workdir),
                          "--max-pixels", str(max_pixels), "--log-level", "warning",
                          timeout=600)
    try:
        gateway = start_gateway(server.target, run_dir)
        try:
            wall_s, steps = asyncio.run(replay_sessions(gateway.base_url, screenshots[:agents],
                                                        replay))
        finally:
            gateway.terminate()
        count_tokens(server, steps)
        with ControlClient(server.control_target) as control:
            status = control.memory_status()
        return Measured(model, agents, wall_s, steps,
                        {s.session_id: {"tokens": s.tokens, "bytes": s.bytes}
                         for s in status.sessions},
                        status.kv_bytes, peak_rss_bytes(server.pid))
    finally:
        server.terminate()


async def replay_sessions(base_url: str, screenshots: list[list[bytes]], replay: Replay
                          ) -> tuple[float, list[Step]]:
    """A warm-up request, then every session at once; returns the wall time and steps."""
    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0,
                                  timeout=1800) as client:
        warm_up = [{"role": "system", "content": "warm-up"},
                   user_turn(1, screenshot_png(WARM_UP_SEED, (280, 560)))]
        await agent_step(client, warm_up, None, Replay(steps=1, max_tokens=2))
        started = time.perf_counter()
        sessions = await asyncio.gather(*(run_session(client, i, shots, replay)
                                          for i, shots in enumerate(screenshots)))
        wall_s = time.perf_counter() - started
    return wall_s, sorted((s for steps in sessions for s in steps),
                          key=lambda s: (s.step, s.session))


def count_tokens(server: ServerProcess, steps: list[Step]) -> None:
    """Fill in each step's image tokens and reusable tokens from CountTokens, with the
    messages converted as the gateway converts them."""
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def count(messages: list[dict]) -> pb.CountTokensResponse:
            body = ChatCompletionRequest(model=DEFAULT_MODEL_NAME, messages=messages)
            request = pb.CountTokensRequest(messages=to_generate_request(body).messages)
            return stub.CountTokens(request, timeout=120)

        for step in steps:
            step.image_tokens = count(step.messages).image_tokens
            if step.step > 1:
                previous_user = max(i for i, m in enumerate(step.messages[:-1])
                                    if m["role"] == "user")
                # Counted with the generation prompt the service adds: a few tokens more
                # than could be reused, so cached / reusable errs low.
                step.reusable_tokens = count(step.messages[:previous_user]).prompt_tokens


def peak_rss_bytes(pid: int) -> int:
    """The process's resident high-water mark (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


# ---- the command line ---------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.phone_agent",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=MODELS,
                        help="model to replay against (repeatable; default: both)")
    parser.add_argument("-k", "--agents", action="append", type=int,
                        help="concurrent agent sessions (repeatable; default: 1 and 4)")
    parser.add_argument("--steps", type=int, default=3, help="steps per session")
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="max_tokens per step (the agent asks for 3000)")
    parser.add_argument("--max-pixels", type=int, default=AGENT_MAX_PIXELS,
                        help="the service's --max-pixels")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="checkpoints and logs (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    replay = Replay(steps=args.steps, max_tokens=args.max_tokens)
    print_load("phone_agent")
    with tempfile.TemporaryDirectory(prefix="phone-agent-") as tmp:
        results = benchmark(args.model or MODELS, args.agents or [1, 4], replay,
                            args.workdir or Path(tmp), max_pixels=args.max_pixels)
    write_report(results, replay, max_pixels=args.max_pixels)


if __name__ == "__main__":
    main()
