"""The request handle's event stream: deltas a reader has not taken yet are merged."""

from __future__ import annotations

import asyncio

from inference_svc.engine.jobs import RequestHandle
from inference_svc.types import (
    ChatMessage,
    ChoiceEnd,
    Delta,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextPart,
    Usage,
)


def test_waiting_deltas_of_one_choice_arrive_merged_and_in_order():
    async def main():
        request = GenerationRequest("r", [ChatMessage("user", [TextPart("hi")])],
                                    SamplingParams())
        handle = RequestHandle(request, asyncio.get_running_loop())
        for event in (Delta("a"), Delta("b", reasoning="r"), Delta("x", index=1),
                      Delta("c"), ChoiceEnd(1, FinishReason.STOP, 1),
                      Finished(FinishReason.STOP, Usage())):
            handle.push(event)
        await asyncio.sleep(0)  # the pushes land (call_soon_threadsafe)
        return [event async for event in handle.events()]

    events = asyncio.run(main())
    assert events[:3] == [Delta("ab", reasoning="r"), Delta("x", index=1), Delta("c")]
    assert isinstance(events[3], ChoiceEnd) and isinstance(events[4], Finished)
