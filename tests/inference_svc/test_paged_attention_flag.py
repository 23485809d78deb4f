"""--paged-attention flex through a real server: its replies are the gather server's, for
several streams at once (decode rows of different lengths in one step)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import running_server, text_request

PROMPTS = ["Hello, how are you?", "List three colours.",
           "Write a long sentence about the sea and the sky and the wind."]


def greedy_replies(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)

        def reply(prompt: str) -> str:
            request = text_request(prompt, max_new_tokens=24, min_new_tokens=24,
                                   temperature=0, repetition_penalty=1.0)
            return "".join(r.text_delta for r in stub.Generate(request))

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(reply, PROMPTS))


@pytest.mark.timeout(300)
def test_a_flex_server_answers_as_the_gather_server(tiny_bundle, tmp_path, inference_server):
    with running_server(tmp_path, tiny_bundle, "--paged-attention", "flex") as flex:
        flexed = greedy_replies(flex.target)
        started = flex.log_path.read_text()
    assert "decode_steps" in started and "flex" in started
    assert flexed == greedy_replies(inference_server.target)
    assert all(flexed)
