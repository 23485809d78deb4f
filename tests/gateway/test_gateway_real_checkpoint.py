"""The phone agent against a checkpoint made of GLM-4.1V-9B-Thinking's own files.

The checkpoint (tests/fixtures/real_glm4v.py) has the real chat template, tokenizer
config, processor configs and config.json (flat layout, four eos ids, `</answer>` among
them, no generation_config.json), rigged to reply
`<think>THOUGHT</think><answer>ACTION</answer><|endoftext|>`: it must stop at
`</answer>`, as the real model does, and the agent's own parsing must read the same action
from our reply as from vLLM's. vLLM drops the text of the stop token that ended a reply
(its detokenizer skips it unless include_stop_str_in_output), so its content is
`<think>THOUGHT</think><answer>ACTION`.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from gateway_harness import openai_through_gateway
from test_gateway_phone_agent import LAUNCH, MODEL, agent_request, parse_action, parse_response
from transformers import AutoTokenizer

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, open_channel, start_server
from tests.fixtures.real_glm4v import require_real_files, write_real_files_checkpoint
from tests.phone_agent_messages import agent_step_messages, first_difference, vllm_prompt
from tests.scripted_glm4v import ACTION, THOUGHT, write_scripted_glm4v_checkpoint

pytestmark = pytest.mark.timeout(300)
VLLM_CONTENT = f"<think>{THOUGHT}</think><answer>{ACTION}"
REPLY_TOKENS = 6  # <think> THOUGHT </think> <answer> ACTION </answer>


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    files = require_real_files()
    return write_scripted_glm4v_checkpoint(
        tmp_path_factory.mktemp("real-scripted") / "glm4v",
        base=lambda out: write_real_files_checkpoint(out, files=files))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    process = start_server(tmp_path_factory.mktemp("real-server"), checkpoint,
                           "--min-new-tokens", "0")
    yield process
    process.terminate()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai_through_gateway(server.target) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.InferenceServiceStub]:
    with open_channel(server.target) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def test_the_agent_reads_the_same_action_from_our_reply_as_from_vllms(client):
    raw, _ = agent_request(client, agent_step_messages(0, []), extra_body={})
    ours = parse_action(parse_response(raw)[1])
    assert ours == parse_action(parse_response(VLLM_CONTENT)[1]) == LAUNCH


def test_a_reply_stops_at_answer_close_not_streamed_with_the_prompt_vllm_renders(client,
                                                                                 checkpoint):
    """Non-streamed, third step: the reply ends at `</answer>` (not at the
    <|endoftext|> the script goes on to), and the prompt costs what vLLM's does."""
    replies = [f"<think>{THOUGHT}</think><answer>{ACTION}</answer>"] * 2
    messages = agent_step_messages(2, replies)
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=3000, temperature=0.0, top_p=0.85,
        frequency_penalty=0.2)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == REPLY_TOKENS
    assert parse_action(parse_response(reply.choices[0].message.content)[1]) == LAUNCH
    reference = vllm_prompt(AutoTokenizer.from_pretrained(checkpoint), messages, [3108],
                            151343)
    assert reply.usage.prompt_tokens == len(reference), first_difference([], reference)


def test_over_grpc_generation_ends_at_the_answer_close_eos(stub):
    request = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Open the settings")])],
        sampling=pb.SamplingParams(max_new_tokens=64, temperature=0), return_reasoning=True)
    responses = list(stub.Generate(request))
    final = responses[-1].final
    assert final.finish_reason == pb.FINISH_REASON_STOP
    assert final.usage.completion_tokens == REPLY_TOKENS
    assert "".join(r.text_delta for r in responses) == ACTION
    assert "".join(r.reasoning_delta for r in responses) == THOUGHT


def test_model_info_shows_the_files_read(stub):
    details = stub.GetModelInfo(pb.GetModelInfoRequest()).details
    assert details["config_layout"] == "flat"
    assert [int(i) for i in details["eos_token_ids"]] == [151329, 151336, 151338, 151348]
    assert details["chat_template"] == "chat_template.jinja"
