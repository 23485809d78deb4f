"""No request can stop the service: numerics guarded where they enter, over a real channel."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.conftest import text_request


def generate(stub, req) -> tuple[str, pb.FinalMessage]:
    responses = list(stub.Generate(req, timeout=60))
    return "".join(r.text_delta for r in responses), responses[-1].final


def bad_request_field(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            violations = error_details_pb2.BadRequest()
            detail.Unpack(violations)
            return violations.field_violations[0].field
    return ""


def test_a_near_zero_temperature_is_greedy_and_everyone_keeps_being_served(stub):
    tiny, final = generate(stub, text_request("Sunny day", temperature=1e-38, max_new_tokens=12,
                                              min_new_tokens=12))
    greedy, _ = generate(stub, text_request("Sunny day", temperature=0, max_new_tokens=12,
                                            min_new_tokens=12))
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert tiny == greedy
    _, after = generate(stub, text_request("still there?", max_new_tokens=4, min_new_tokens=4,
                                           seed=3))
    assert after.usage.completion_tokens == 4


def test_a_vanishing_repetition_penalty_is_invalid(stub):
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, text_request("hi", temperature=1, repetition_penalty=1e-38))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == "sampling.repetition_penalty"
    _, after = generate(stub, text_request("and now?", max_new_tokens=3, min_new_tokens=3))
    assert after.usage.completion_tokens == 3


@pytest.mark.parametrize("field,value", [("temperature", float("nan")),
                                         ("top_p", float("inf")),
                                         ("frequency_penalty", float("-inf"))])
def test_non_finite_sampling_values_are_invalid(stub, field, value):
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, text_request("hi", **{field: value}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(info.value) == f"sampling.{field}"
