"""Request bytes that do not parse are INVALID_ARGUMENT on every service, not UNKNOWN."""

from __future__ import annotations

import grpc
import pytest

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb

INFERENCE = "/autoglm.inference.v1.InferenceService/"
CONTROL = "/autoglm.control.v1.ControlService/"
GARBAGE = b"\xff\xff\xff\xff\xff\xff"
BAD_UTF8 = b"\xff\xfe\xfd"


def raw_call(channel: grpc.Channel, method: str, data: bytes, *, streaming: bool):
    """Send `data` as the request bytes, exactly; responses stay undecoded."""
    if streaming:
        return list(channel.unary_stream(method)(data, timeout=10))
    return channel.unary_unary(method)(data, timeout=10)


def text_request() -> bytes:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="hello there")])],
        sampling=pb.SamplingParams(max_new_tokens=2),
    ).SerializeToString()


PUBLIC_CASES = [
    ("Generate", True, GARBAGE, "GenerateRequest"),
    ("Generate", True, text_request()[:-3], "GenerateRequest"),
    ("Generate", True, text_request().replace(b"hello there", b"hello\xff\xfehere"),
     "GenerateRequest"),
    ("CountTokens", False, GARBAGE, "CountTokensRequest"),
    ("EndSession", False, b"\x0a\x03" + BAD_UTF8, "EndSessionRequest"),
    ("GetModelInfo", False, GARBAGE, "GetModelInfoRequest"),
]


@pytest.mark.parametrize(("rpc", "streaming", "data", "message"), PUBLIC_CASES,
                         ids=["garbage", "truncated", "bad-utf8", "count-tokens", "end-session",
                              "model-info"])
def test_undecodable_public_requests_are_invalid_argument(inference_server, rpc, streaming,
                                                          data, message):
    with grpc.insecure_channel(inference_server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            raw_call(channel, INFERENCE + rpc, data, streaming=streaming)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"request is not a valid {message}: ")
        replies = raw_call(channel, INFERENCE + "Generate", text_request(), streaming=True)
        assert pb.GenerateResponse.FromString(replies[-1]).final.usage.completion_tokens == 2


@pytest.mark.parametrize(("rpc", "streaming", "data", "message"), [
    ("GetMemoryStatus", False, GARBAGE, "GetMemoryStatusRequest"),
    ("WatchMemory", True, GARBAGE, "WatchMemoryRequest"),
    ("OffloadModules", False, b"\x0a\x03" + BAD_UTF8, "OffloadModulesRequest"),
    ("SetAdmission", False, cpb.SetAdmissionRequest(max_running=3).SerializeToString()[:-1],
     "SetAdmissionRequest"),
])
def test_undecodable_control_requests_are_invalid_argument(inference_server, rpc, streaming,
                                                           data, message):
    with grpc.insecure_channel(inference_server.control_target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            raw_call(channel, CONTROL + rpc, data, streaming=streaming)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(f"request is not a valid {message}: ")
        reply = raw_call(channel, CONTROL + "GetMemoryStatus", b"", streaming=False)
        assert cpb.GetMemoryStatusResponse.FromString(reply).HasField("status")


def test_undecodable_request_keeps_its_request_id(inference_server):
    with grpc.insecure_channel(inference_server.target) as channel:
        call = channel.unary_unary(INFERENCE + "CountTokens")
        with pytest.raises(grpc.RpcError) as info:
            call(GARBAGE, metadata=[("x-request-id", "rid-garbage")], timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("x-request-id", "rid-garbage") in info.value.trailing_metadata()
