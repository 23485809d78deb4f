"""gRPC `GenerateResponse` messages -> OpenAI chat-completion JSON and SSE chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from autoglm.inference.v1 import inference_service_pb2 as pb

from .structured import ToolPlan, logprobs_to_openai, tool_calls

SSE_DONE = b"data: [DONE]\n\n"

_FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_STOP_SEQUENCE: "stop",
    pb.FINISH_REASON_LENGTH: "length",
}


def openai_finish_reason(reason: pb.FinishReason) -> str | None:
    """OpenAI's finish_reason; None for CANCELLED (and anything unknown)."""
    return _FINISH_REASONS.get(reason)


def usage_to_openai(usage: pb.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def choice_reasons(final: pb.FinalMessage) -> dict[int, pb.FinishReason.ValueType]:
    """Each choice's finish reason: from `choices` when n > 1, else the final's own."""
    return {c.index: c.finish_reason for c in final.choices} or {0: final.finish_reason}


def _call_id_seed(request_id: str, index: int) -> str:
    return request_id if index == 0 else f"{request_id}#{index}"


@dataclass(slots=True)
class _ChoiceParts:
    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)


@dataclass(slots=True)
class CompletionAccumulator:
    """Collects a whole Generate stream for a non-streaming answer, choice by choice
    (each message names its choice in `index`)."""

    request_id: str = ""
    choices: dict[int, _ChoiceParts] = field(default_factory=dict)
    final: pb.FinalMessage | None = None
    wants_logprobs: bool = False
    tool: ToolPlan | None = None

    def add(self, response: pb.GenerateResponse) -> None:
        if response.request_id and not self.request_id:
            self.request_id = response.request_id
        parts = self.choices.setdefault(response.index, _ChoiceParts())
        if response.text_delta:
            parts.content.append(response.text_delta)
        if response.reasoning_delta:
            parts.reasoning.append(response.reasoning_delta)
        parts.logprobs.extend(response.logprobs)
        if response.HasField("final"):
            self.final = response.final

    def to_openai(self, final: pb.FinalMessage, *, model: str, created: int) -> dict[str, Any]:
        reasons = choice_reasons(final)
        return {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [self._choice(index, reasons[index]) for index in sorted(reasons)],
            "usage": usage_to_openai(final.usage),
        }

    def _choice(self, index: int, reason: pb.FinishReason.ValueType) -> dict[str, Any]:
        parts = self.choices.get(index) or _ChoiceParts()
        content = "".join(parts.content)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish_reason = openai_finish_reason(reason)
        calls = (tool_calls(self.tool, content, _call_id_seed(self.request_id, index))
                 if self.tool else None)
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            if finish_reason == "stop":
                finish_reason = "tool_calls"
        if parts.reasoning:
            message["reasoning_content"] = "".join(parts.reasoning)
        return {
            "index": index,
            "message": message,
            "logprobs": ({"content": logprobs_to_openai(parts.logprobs), "refusal": None}
                         if self.wants_logprobs else None),
            "finish_reason": finish_reason,
        }


@dataclass(slots=True, frozen=True)
class ChunkBuilder:
    """Builds the `chat.completion.chunk` objects of one streamed answer, each choice's
    chunks carrying its index. A tool call's JSON is held back and sent whole as
    `tool_calls` with that choice's finish chunk."""

    request_id: str
    model: str
    created: int
    include_usage: bool
    wants_logprobs: bool = False
    tool: ToolPlan | None = None
    n: int = 1
    tool_text: dict[int, list[str]] = field(default_factory=dict)

    def role_chunks(self) -> list[dict[str, Any]]:
        return [self._chunk({"role": "assistant", "content": ""}, index=i)
                for i in range(self.n)]

    def delta_chunk(self, response: pb.GenerateResponse) -> dict[str, Any] | None:
        delta: dict[str, Any] = {}
        if response.reasoning_delta:
            delta["reasoning_content"] = response.reasoning_delta
        if response.text_delta and self.tool is not None:
            self.tool_text.setdefault(response.index, []).append(response.text_delta)
        elif response.text_delta:
            delta["content"] = response.text_delta
        logprobs = None
        if self.wants_logprobs and response.logprobs:
            logprobs = {"content": logprobs_to_openai(response.logprobs), "refusal": None}
        if not (delta or logprobs):
            return None
        chunk = self._chunk(delta, index=response.index)
        chunk["choices"][0]["logprobs"] = logprobs
        return chunk

    def finish_chunk(self, reason: pb.FinishReason.ValueType, index: int = 0) -> dict[str, Any]:
        finish_reason = openai_finish_reason(reason)
        if self.tool is None:
            return self._chunk({}, finish_reason=finish_reason, index=index)
        text = "".join(self.tool_text.get(index, []))
        calls = tool_calls(self.tool, text, _call_id_seed(self.request_id, index))
        if calls is None:  # cut short: what was generated, as text
            return self._chunk({"content": text} if text else {}, finish_reason=finish_reason,
                               index=index)
        delta = {"tool_calls": [{"index": 0, **call} for call in calls]}
        return self._chunk(delta, finish_reason="tool_calls" if finish_reason == "stop"
                           else finish_reason, index=index)

    def usage_chunk(self, final: pb.FinalMessage) -> dict[str, Any]:
        chunk = self._envelope()
        chunk["choices"] = []
        chunk["usage"] = usage_to_openai(final.usage)
        return chunk

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None = None,
               index: int = 0) -> dict[str, Any]:
        chunk = self._envelope()
        chunk["choices"] = [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ]
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.request_id}",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }
