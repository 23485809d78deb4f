"""Sampling parameters and stream events: proto <-> Python values."""

import pytest
from autoglm_client import (
    ChoiceEnd,
    Final,
    FinishReason,
    ProtocolError,
    ReasoningDelta,
    Sampling,
    TextDelta,
)
from autoglm_client.results import CompletionAccumulator, events_from_response

from autoglm.inference.v1 import inference_service_pb2 as pb


def test_sampling_leaves_unset_fields_unset() -> None:
    params = Sampling(temperature=0.0, top_k=0, stop_sequences=["x"]).to_pb()
    assert params.HasField("temperature")
    assert params.HasField("top_k")
    assert not params.HasField("max_new_tokens")
    assert not params.HasField("seed")
    assert list(params.stop_sequences) == ["x"]


def test_one_response_can_carry_reasoning_text_and_final() -> None:
    response = pb.GenerateResponse(
        reasoning_delta="r",
        text_delta="t",
        request_id="id",
        final=pb.FinalMessage(finish_reason=pb.FINISH_REASON_LENGTH),
    )
    reasoning, text, final = events_from_response(response)
    assert (reasoning, text) == (ReasoningDelta("r"), TextDelta("t"))
    assert isinstance(final, Final)
    assert (final.finish_reason, final.request_id) == (FinishReason.LENGTH, "id")


@pytest.mark.parametrize("reason", list(pb.FinishReason.values()))
def test_every_finish_reason_maps(reason: int) -> None:
    assert FinishReason.from_pb(reason).name == pb.FinishReason.Name(reason).removeprefix(
        "FINISH_REASON_"
    )


def test_accumulator_joins_deltas_and_requires_final() -> None:
    accumulator = CompletionAccumulator()
    for event in (TextDelta("你"), ReasoningDelta("hm"), TextDelta("好")):
        accumulator.add(event)
    with pytest.raises(ProtocolError):
        accumulator.completion()
    accumulator.add(Final.from_pb(pb.FinalMessage(finish_reason=pb.FINISH_REASON_STOP), "id"))
    completion = accumulator.completion()
    assert (completion.text, completion.reasoning) == ("你好", "hm")
    assert completion.finish_reason is FinishReason.STOP


def test_accumulator_keeps_each_choice_apart() -> None:
    responses = [
        pb.GenerateResponse(text_delta="a", index=0),
        pb.GenerateResponse(text_delta="b", index=1),
        pb.GenerateResponse(text_delta="c", index=0),
        pb.GenerateResponse(index=1, choice_end=pb.ChoiceEnd(
            index=1, finish_reason=pb.FINISH_REASON_STOP, completion_tokens=1)),
        pb.GenerateResponse(index=0, choice_end=pb.ChoiceEnd(
            index=0, finish_reason=pb.FINISH_REASON_LENGTH, completion_tokens=2)),
        pb.GenerateResponse(final=pb.FinalMessage(
            finish_reason=pb.FINISH_REASON_LENGTH, usage=pb.Usage(completion_tokens=3),
            choices=[pb.ChoiceEnd(index=0, finish_reason=pb.FINISH_REASON_LENGTH,
                                  completion_tokens=2),
                     pb.ChoiceEnd(index=1, finish_reason=pb.FINISH_REASON_STOP,
                                  completion_tokens=1)])),
    ]
    accumulator = CompletionAccumulator()
    events = [e for r in responses for e in events_from_response(r)]
    assert next(e for e in events if isinstance(e, ChoiceEnd)).index == 1
    for event in events:
        accumulator.add(event)
    completion = accumulator.completion()
    assert completion.text == "ac"
    assert [(c.index, c.text, c.finish_reason) for c in completion.choices] == [
        (0, "ac", FinishReason.LENGTH), (1, "b", FinishReason.STOP)]
    assert [c.completion_tokens for c in completion.final.choices] == [2, 1]
