"""Clients that time one streamed generation: our gRPC service, an OpenAI-compatible server."""

from __future__ import annotations

import json
import time

import httpx

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import Sampling, StreamResult

ROLES = {"system": pb.ROLE_SYSTEM, "user": pb.ROLE_USER, "assistant": pb.ROLE_ASSISTANT}


def to_pb_messages(messages: list[dict[str, str]]) -> list[pb.Message]:
    return [pb.Message(role=ROLES[m["role"]], parts=[pb.Part(text=m["content"])])
            for m in messages]


async def grpc_generate(stub: pb_grpc.InferenceServiceStub, messages: list[dict[str, str]],
                        sampling: Sampling, *, session_id: str = "") -> StreamResult:
    request = pb.GenerateRequest(
        messages=to_pb_messages(messages), session_id=session_id,
        sampling=pb.SamplingParams(
            max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature, top_p=sampling.top_p,
            repetition_penalty=sampling.repetition_penalty,
        ),
    )
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    final = None
    async for response in stub.Generate(request, timeout=600):
        if response.text_delta and first is None:
            first = time.perf_counter()
        pieces.append(response.text_delta)
        if response.HasField("final"):
            final = response.final
    ended = time.perf_counter()
    assert final is not None, "the stream ended without its final message"
    return StreamResult(
        ttft_s=(first or ended) - started, total_s=ended - started,
        completion_tokens=final.usage.completion_tokens, prompt_tokens=final.usage.prompt_tokens,
        cached_prompt_tokens=final.usage.cached_prompt_tokens, text="".join(pieces),
    )


def openai_body(model: str, messages: list[dict[str, str]], sampling: Sampling,
                generation_defaults: dict) -> dict:
    """A streamed chat-completions request; `generation_config` carries what OpenAI's
    fields cannot say (min_new_tokens, repetition_penalty), over the model's defaults."""
    generation = {**generation_defaults, **sampling.generate_kwargs()}
    return {
        "model": model, "messages": messages, "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature, "top_p": sampling.top_p,
        "generation_config": json.dumps(generation),
    }


async def openai_generate(client: httpx.AsyncClient, body: dict) -> StreamResult:
    started = time.perf_counter()
    first: float | None = None
    pieces: list[str] = []
    usage: dict | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert "error" not in chunk, chunk
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    pieces.append(content)
            usage = chunk.get("usage") or usage
    ended = time.perf_counter()
    assert usage is not None, "the stream carried no usage"
    return StreamResult(
        ttft_s=(first or ended) - started, total_s=ended - started,
        completion_tokens=usage["completion_tokens"], prompt_tokens=usage["prompt_tokens"],
        text="".join(pieces),
    )
