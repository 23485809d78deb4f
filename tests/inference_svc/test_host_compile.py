"""--host-compile through a real server: it compiles its decode step before it serves,
says so in its log, and answers greedy requests as a server with eager steps does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, open_channel, running_server, text_request


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("compiled-server"), tiny_bundle,
                        "--host-compile") as server:
        yield server


def greedy_text(target: str, prompt: str) -> str:
    with open_channel(target) as channel:
        replies = list(pb_grpc.InferenceServiceStub(channel).Generate(
            text_request(prompt, max_new_tokens=16, min_new_tokens=16, temperature=0)))
    assert replies[-1].final.usage.completion_tokens == 16
    return "".join(r.text_delta for r in replies)


def test_the_server_compiles_its_decode_step_before_it_serves(server):
    events = [json.loads(line) for line in server.log_path.read_text().splitlines()
              if line.startswith("{")]
    compiled = [e for e in events if e.get("event") == "host_compile"]
    assert [e["compiled"] for e in compiled] == [True]
    assert not [e for e in events if e.get("event") == "host_compile_off"]


@pytest.mark.parametrize("prompt", ["Hello, how are you?", "Write a haiku about rain."])
def test_compiled_steps_answer_as_eager_steps_do(server, inference_server, prompt):
    assert greedy_text(server.target, prompt) == greedy_text(inference_server.target, prompt)
