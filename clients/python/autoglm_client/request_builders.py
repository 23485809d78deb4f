"""Sampling parameters and the request messages built from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.content import Conversation, to_messages


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling and stopping parameters; None leaves a field to the server's default."""

    max_new_tokens: int | None = None
    min_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop_sequences: Sequence[str] = field(default=())

    def to_pb(self) -> pb.SamplingParams:
        values = {
            name: getattr(self, name)
            for name in self.__slots__
            if name != "stop_sequences" and getattr(self, name) is not None
        }
        return pb.SamplingParams(**values, stop_sequences=list(self.stop_sequences))


def generate_request(
    conversation: Conversation,
    sampling: Sampling | None = None,
    *,
    session_id: str | None = None,
    enable_thinking: bool = False,
    return_reasoning: bool = False,
    priority: int = 0,
) -> pb.GenerateRequest:
    """A GenerateRequest for a conversation (see `content.to_messages`)."""
    return pb.GenerateRequest(
        messages=to_messages(conversation),
        sampling=(sampling or Sampling()).to_pb(),
        session_id=session_id or "",
        enable_thinking=enable_thinking,
        return_reasoning=return_reasoning,
        priority=priority,
    )


def count_tokens_request(
    conversation: Conversation, *, enable_thinking: bool = False
) -> pb.CountTokensRequest:
    """A CountTokensRequest for a conversation."""
    return pb.CountTokensRequest(
        messages=to_messages(conversation), enable_thinking=enable_thinking
    )
