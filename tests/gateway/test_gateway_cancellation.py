"""A client that goes away must cancel the upstream Generate call."""

from __future__ import annotations

import httpx

from tests.support.fake_inference import FakeInferenceService

BODY = {"model": "autoglm-phone-9b", "messages": [{"role": "user", "content": "hi"}]}


def test_client_disconnect_mid_stream_cancels_the_upstream_call(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = fake_service.endless()

    with (
        httpx.Client(base_url=gateway_url) as http,
        http.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as response,
    ):
        events = response.iter_lines()
        data_lines = [line for line in (next(events) for _ in range(6)) if line]
        assert all(line.startswith("data: {") for line in data_lines)
        assert not fake_service.endless_stream_ended.is_set()

    assert fake_service.endless_stream_ended.wait(timeout=10)


def test_client_disconnect_while_waiting_for_a_whole_answer_cancels_the_upstream_call(
    gateway_url: str, fake_service: FakeInferenceService
) -> None:
    fake_service.script = fake_service.endless()

    with httpx.Client(base_url=gateway_url, timeout=httpx.Timeout(5.0, read=0.3)) as http:
        try:
            http.post("/v1/chat/completions", json=BODY)
        except httpx.ReadTimeout:
            pass
        else:
            raise AssertionError("an endless generation cannot complete")
        assert len(fake_service.requests) == 1

    assert fake_service.endless_stream_ended.wait(timeout=10)
