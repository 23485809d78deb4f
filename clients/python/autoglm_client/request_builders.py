"""Sampling parameters and the request messages built from them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm_client.content import PCM_ENCODINGS, Conversation, to_messages
from autoglm_client.errors import InputError


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A format the reply must follow (constrained decoding); build with the class methods."""

    kind: str
    schema: str = ""
    name: str = ""
    strict: bool = False
    pattern: str = ""

    @classmethod
    def json_object(cls) -> ResponseFormat:
        return cls("json_object")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, *, name: str = "",
                    strict: bool = False) -> ResponseFormat:
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json_schema", schema=text, name=name, strict=strict)

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        return cls("regex", pattern=pattern)

    def to_pb(self) -> pb.ResponseFormat:
        if self.kind == "json_schema":
            return pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
                name=self.name, schema=self.schema, strict=self.strict))
        if self.kind == "regex":
            return pb.ResponseFormat(regex=self.pattern)
        return pb.ResponseFormat(json_object=pb.JsonObjectFormat())


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
    response_format: ResponseFormat | None = None
    logprobs: int | None = None  # per-token log probabilities with this many alternatives

    def to_pb(self) -> pb.SamplingParams:
        special = {"stop_sequences", "response_format"}
        values = {
            name: getattr(self, name)
            for name in self.__slots__
            if name not in special and getattr(self, name) is not None
        }
        params = pb.SamplingParams(**values, stop_sequences=list(self.stop_sequences))
        if self.response_format is not None:
            params.response_format.CopyFrom(self.response_format.to_pb())
        return params


def generate_request(
    conversation: Conversation,
    sampling: Sampling | None = None,
    *,
    session_id: str | None = None,
    enable_thinking: bool = False,
    return_reasoning: bool = False,
    priority: int = 0,
    n: int = 1,
) -> pb.GenerateRequest:
    """A GenerateRequest for a conversation (see `content.to_messages`); `n` choices."""
    return pb.GenerateRequest(
        messages=to_messages(conversation),
        sampling=(sampling or Sampling()).to_pb(),
        session_id=session_id or "",
        enable_thinking=enable_thinking,
        return_reasoning=return_reasoning,
        priority=priority,
        n=n if n != 1 else 0,
    )


def live_start(
    conversation: Conversation,
    sampling: Sampling | None = None,
    *,
    sample_rate_hz: int = 16_000,
    encoding: str = "s16le",
    **fields: Any,
) -> pb.GenerateLiveStart:
    """GenerateLive's first message: the request as `generate_request` builds it (`fields`:
    session_id, enable_thinking, ...) and the audio format, 16 kHz mono s16le or f32le."""
    if encoding not in PCM_ENCODINGS:
        raise InputError(f"unknown PCM encoding {encoding!r}; use one of {tuple(PCM_ENCODINGS)}")
    return pb.GenerateLiveStart(
        request=generate_request(conversation, sampling, **fields),
        format=pb.LiveAudioFormat(sample_rate_hz=sample_rate_hz,
                                  encoding=PCM_ENCODINGS[encoding]),
    )


def count_tokens_request(
    conversation: Conversation, *, enable_thinking: bool = False
) -> pb.CountTokensRequest:
    """A CountTokensRequest for a conversation."""
    return pb.CountTokensRequest(
        messages=to_messages(conversation), enable_thinking=enable_thinking
    )
