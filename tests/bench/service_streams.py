"""N concurrent streams through a real service over gRPC: aggregate tokens/s, nothing else.

Splits the concurrency benchmark's numbers by cause: run it with short or agent-length
prompts, greedy or the benchmark's sampling, to see what each costs.

  PYTHONPATH=$PWD:$PWD/clients/python .venv/bin/python -m tests.bench.service_streams \
      --streams 16 --tokens 64 --prompt short --sampling greedy
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import grpc

from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import Sampling, unique_tag
from tests.bench.prompts import single_turn
from tests.bench.streams import grpc_generate
from tests.conftest import start_server

SAMPLINGS = {"greedy": {"temperature": 0.0, "repetition_penalty": 1.0},
             "bench": {}}  # the concurrency benchmark's: Sampling's defaults


def conversation(kind: str, index: int) -> list[dict[str, str]]:
    if kind == "agent":  # the benchmark's: a phone-agent system prompt and task
        return single_turn(unique_tag())
    return [{"role": "user", "content": f"{unique_tag()} {index} Tell me a story about a "
             "phone agent tapping through settings."}]


async def round_of(target: str, streams: int, sampling: Sampling, prompt: str) -> float:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        started = time.perf_counter()
        results = await asyncio.gather(*(
            grpc_generate(stub, conversation(prompt, i), sampling) for i in range(streams)))
        elapsed = time.perf_counter() - started
    return sum(r.completion_tokens for r in results) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", choices=["short", "agent"], default="short")
    parser.add_argument("--sampling", choices=sorted(SAMPLINGS), default="greedy")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sampling = Sampling(max_new_tokens=args.tokens, **SAMPLINGS[args.sampling])
    server = start_server(Path(tempfile.mkdtemp(prefix="service-streams-")), None)
    try:
        asyncio.run(round_of(server.target, args.streams, sampling, args.prompt))  # warm up
        for _ in range(args.rounds):
            rate = asyncio.run(round_of(server.target, args.streams, sampling, args.prompt))
            print(f"{args.streams} streams, {args.prompt} prompts, {args.sampling} sampling: "
                  f"{rate:.1f} tok/s")
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
