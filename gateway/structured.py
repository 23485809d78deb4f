"""Structured output over the chat-completions API: `response_format`, `tools` with a
forced `tool_choice`, and `logprobs`, mapped onto the gRPC contract's constrained decoding.

A forced tool call is a JSON Schema response format: the function's parameters for a
named function, or {"name", "arguments"} over every tool for `tool_choice: "required"`;
the generated JSON becomes the reply's `tool_calls`. `tool_choice: "auto"` would need the
model's own tool-call syntax in its chat template, which the served models lack, so it
is refused with a 400 that says what to send instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from autoglm.inference.v1 import inference_service_pb2 as pb

from .errors import BadRequest
from .openai_schema import ChatCompletionRequest

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class ToolPlan:
    """How the reply becomes a tool call: the named function, or (None) the name is in
    the generated JSON's "name" and its arguments in "arguments"."""

    function: str | None
    schema_param: str  # the request field the schema came from, for upstream errors


@dataclass(frozen=True)
class StructuredPlan:
    response_format: pb.ResponseFormat | None = None
    schema_param: str | None = None
    tool: ToolPlan | None = None
    instructions: str = ""  # a system note telling the model which tool to call
    logprobs: int | None = None


def plan(body: ChatCompletionRequest) -> StructuredPlan:
    """What the body asks for beyond text; `BadRequest` for what cannot be honoured."""
    logprobs = _logprobs(body)
    if body.functions:
        raise BadRequest("the legacy 'functions' field is not supported; use 'tools'",
                         param="functions", code="unsupported_value")
    if body.tools and body.tool_choice != "none":
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise BadRequest("response_format cannot be combined with a forced tool call",
                             param="response_format", code="unsupported_value")
        fmt, tool, instructions = _tool_call(body)
        return StructuredPlan(fmt, tool.schema_param, tool, instructions, logprobs)
    fmt, param = _response_format(body.response_format)
    return StructuredPlan(fmt, param, None, "", logprobs)


def _logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    if not body.logprobs:
        return None
    return body.top_logprobs or 0


def _response_format(response_format: dict[str, Any] | None
                     ) -> tuple[pb.ResponseFormat | None, str | None]:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None, None
    if kind == "json_object":
        return pb.ResponseFormat(json_object=pb.JsonObjectFormat()), "response_format"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise BadRequest("response_format.json_schema must be an object",
                             param="response_format.json_schema")
        schema = spec.get("schema")
        if schema is None:
            schema = {}  # OpenAI's default: any JSON
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object",
                             param="response_format.json_schema.schema")
        return (pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
            name=str(spec.get("name", "")), schema=json.dumps(schema),
            strict=bool(spec.get("strict") or False))), "response_format.json_schema.schema")
    raise BadRequest(f"response_format type {str(kind)[:40]!r} is not supported; use text, "
                     "json_object or json_schema", param="response_format.type",
                     code="unsupported_value")


def _functions(tools: list[Any]) -> dict[str, tuple[int, dict[str, Any]]]:
    """Each tool's name -> (its index, its function object)."""
    functions: dict[str, tuple[int, dict[str, Any]]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not (isinstance(tool, dict) and tool.get("type") == "function"
                and isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise BadRequest("each tool must be {\"type\": \"function\", \"function\": "
                             "{\"name\": ...}}", param=f"tools[{i}]")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise BadRequest("function parameters must be a JSON Schema object",
                             param=f"tools[{i}].function.parameters")
        functions[function["name"]] = (i, function)
    return functions


def _tool_call(body: ChatCompletionRequest) -> tuple[pb.ResponseFormat, ToolPlan, str]:
    functions = _functions(body.tools)
    choice = body.tool_choice if body.tool_choice is not None else "auto"
    if choice == "auto":
        raise BadRequest("tool_choice 'auto' is not supported: the served model's chat "
                         "template has no tool-call format; send tool_choice 'required' or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                         param="tool_choice", code="unsupported_value")
    if choice == "required":
        variants = [{"type": "object",
                     "properties": {"name": {"const": name},
                                    "arguments": _parameters(function)},
                     "required": ["name", "arguments"], "additionalProperties": False}
                    for name, (_, function) in functions.items()]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
            name="tool_call", schema=json.dumps(schema), strict=True))
        note = ("Call one of these functions. Reply with a JSON object holding the "
                "function's \"name\" and its \"arguments\".\n" + _describe(functions))
        return fmt, ToolPlan(None, "tools"), note
    name = _named(choice)
    if name not in functions:
        raise BadRequest(f"tool_choice names a function that is not in tools: {name[:64]!r}",
                         param="tool_choice.function.name")
    index, function = functions[name]
    fmt = pb.ResponseFormat(json_schema=pb.JsonSchemaFormat(
        name=name, schema=json.dumps(_parameters(function)), strict=True))
    note = (f"Call the function {name}. Reply with its arguments as a JSON object.\n"
            + _describe({name: functions[name]}))
    return fmt, ToolPlan(name, f"tools[{index}].function.parameters"), note


def _named(choice: Any) -> str:
    if (isinstance(choice, dict) and choice.get("type") == "function"
            and isinstance(choice.get("function"), dict)
            and isinstance(choice["function"].get("name"), str)):
        return choice["function"]["name"]
    raise BadRequest("tool_choice must be 'none', 'auto', 'required' or "
                     "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                     param="tool_choice")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}


def _describe(functions: dict[str, tuple[int, dict[str, Any]]]) -> str:
    lines = []
    for name, (_, function) in functions.items():
        description = function.get("description") or ""
        lines.append(f"- {name}: {description} Parameters (JSON Schema): "
                     f"{json.dumps(_parameters(function))}")
    return "\n".join(lines)


def tool_calls(plan: ToolPlan, text: str, request_id: str) -> list[dict[str, Any]] | None:
    """The reply as OpenAI `tool_calls`, or None when the text is not a complete call
    (cut off by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if plan.function is not None:
        name, arguments = plan.function, value
    elif isinstance(value, dict) and "name" in value:
        name, arguments = value["name"], value.get("arguments", {})
    else:
        return None
    call_id = f"call_{uuid.uuid5(uuid.NAMESPACE_OID, request_id + text).hex[:24]}"
    return [{"id": call_id, "type": "function",
             "function": {"name": name, "arguments": json.dumps(arguments,
                                                                ensure_ascii=False)}}]


def logprobs_to_openai(entries) -> list[dict[str, Any]]:
    """gRPC TokenLogprob entries -> OpenAI's `logprobs.content` items."""
    return [
        {"token": e.token, "logprob": e.logprob, "bytes": list(e.token_bytes),
         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.token_bytes)}
                          for a in e.top_logprobs]}
        for e in entries
    ]
