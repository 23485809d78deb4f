"""Structured output through the gateway with the clients people use (the openai SDK and
langchain-openai), in front of the real service on the embedded default model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from gateway_harness import running_gateway
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from gateway.config import GatewayConfig

MODEL = "autoglm-phone-9b"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Person(BaseModel):
    name: str
    age: int


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def gateway(default_model_server: Any) -> Iterator[str]:
    config = GatewayConfig(upstream_target=default_model_server.target)
    with running_gateway(config) as url:
        yield url


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="EMPTY", max_retries=0)


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def test_langchain_structured_output_with_a_pydantic_model_returns_an_instance(
    gateway: str,
) -> None:
    llm = ChatOpenAI(model=MODEL, base_url=f"{gateway}/v1", api_key="EMPTY", temperature=0,
                     max_tokens=64, max_retries=0)

    person = llm.with_structured_output(Person, method="json_schema").invoke(
        "Invent a person: a name and an age.")

    assert isinstance(person, Person)


def test_langchain_json_mode_returns_a_parseable_object(gateway: str) -> None:
    llm = ChatOpenAI(model=MODEL, base_url=f"{gateway}/v1", api_key="EMPTY", temperature=0,
                     max_tokens=48, max_retries=0)

    reply = llm.with_structured_output(None, method="json_mode").invoke(
        "Describe a cat as JSON.")

    assert isinstance(reply, dict)


def test_json_schema_streamed_is_valid_json_and_matches_the_schema(
    client: openai.OpenAI,
) -> None:
    schema = Person.model_json_schema()
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("Invent a person."), max_tokens=64, temperature=0.8, seed=3,
        stream=True, response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": schema,
                                                      "strict": True}}))

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_present_and_consistent(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=user("Say hello."), max_tokens=12, temperature=0,
        logprobs=True, top_logprobs=5, extra_body={"repetition_penalty": 1.0})

    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 5
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        same = [alt for alt in entry.top_logprobs if alt.token == entry.token]
        # greedy without penalties: the chosen token is the most likely one, same value
        assert same and same[0].logprob == entry.logprob == values[0]
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content) == (
        reply.choices[0].message.content)


def test_streamed_logprobs_ride_with_the_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("Count to three."), max_tokens=10, temperature=0,
        logprobs=True, top_logprobs=0, stream=True, stream_options={"include_usage": True}))

    entries = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == chunks[-1].usage.completion_tokens
    assert all(e.top_logprobs == [] for e in entries)


def test_a_named_tool_returns_tool_calls_whose_arguments_validate(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=user("What is the weather in Paris?"), max_tokens=64,
        temperature=0, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})

    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_tool_choice_required_picks_one_of_the_tools(client: openai.OpenAI) -> None:
    other = {"type": "function", "function": {
        "name": "get_time", "parameters": {"type": "object", "properties": {
            "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
            "additionalProperties": False}}}
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=user("Weather in Rome?"), max_tokens=64, temperature=0,
        tools=[WEATHER, other], tool_choice="required", stream=True))

    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    (call,) = calls
    tool = {"get_weather": WEATHER, "get_time": other}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_unusable_schema_is_a_400_naming_the_field(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": user("x"),
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "bad", "schema": {"type": "bogus"}}}})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format.json_schema.schema"


def test_tool_choice_auto_is_a_clear_400(gateway: str) -> None:
    response = httpx.post(f"{gateway}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": user("x"), "tools": [WEATHER], "tool_choice": "auto"})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "required" in error["message"]
