"""/v1/realtime's protocol against the gRPC test double: what a session sends upstream,
errors as `error` events on a connection that stays open, upstream statuses mapped as the
HTTP routes map them, cancelling, leaving, the checks before the upgrade, and server_vad
turn detection (its events, threshold, durations and interruptions)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import websockets.sync.client as ws_client
from gateway_harness import GatewayFactory
from websockets.exceptions import InvalidStatus

from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.support.fake_inference import (
    FakeInferenceService,
    audio_of,
    echo,
    fail,
    prompt_of,
    reply,
)

MODEL = "autoglm-phone-9b"


def url_of(gateway_url: str, query: str = f"?model={MODEL}") -> str:
    return gateway_url.replace("http://", "ws://") + "/v1/realtime" + query


class Session:
    """A raw WebSocket client: sends events as JSON, reads them as dicts."""

    def __init__(self, connection: ws_client.ClientConnection) -> None:
        self.connection = connection
        self.created = self.recv()

    def send(self, event: dict[str, Any] | str) -> None:
        self.connection.send(event if isinstance(event, str) else json.dumps(event))

    def recv(self) -> dict[str, Any]:
        return json.loads(self.connection.recv(timeout=30))

    def until(self, kind: str) -> list[dict[str, Any]]:
        events = [self.recv()]
        while events[-1]["type"] != kind:
            events.append(self.recv())
        return events

    def error_for(self, event: dict[str, Any] | str) -> dict[str, Any]:
        """The error `event` causes (a running response's deltas may come before it)."""
        self.send(event)
        answers = self.until("error")
        assert {answer["type"] for answer in answers[:-1]} <= {"response.output_text.delta"}
        error = answers[-1]["error"]
        assert set(error) == {"type", "code", "message", "param", "event_id"}
        return error

    def say(self, text: str, role: str = "user", **fields: Any) -> dict[str, Any]:
        kind = "input_text" if role != "assistant" else "output_text"
        self.send({"type": "conversation.item.create", **fields,
                   "item": {"type": "message", "role": role,
                            "content": [{"type": kind, "text": text}]}})
        return self.until("conversation.item.done")[-1]["item"]


@pytest.fixture
def session(gateway_url: str, fake_service: FakeInferenceService) -> Iterator[Session]:
    with ws_client.connect(url_of(gateway_url)) as connection:
        yield Session(connection)


def test_items_and_instructions_become_the_request_and_the_reply_joins_the_conversation(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = echo
    session.send({"type": "session.update", "session": {
        "type": "realtime", "instructions": "Be brief.", "max_output_tokens": 9,
        "temperature": 0.5}})
    assert session.recv()["type"] == "session.updated"
    first = session.say("one")
    session.say("zero", previous_item_id="root")
    session.send({"type": "response.create"})
    done = session.until("response.done")[-1]["response"]
    session.say("two")
    session.send({"type": "conversation.item.delete", "item_id": first["id"]})
    assert session.until("conversation.item.deleted")[-1]["item_id"] == first["id"]
    session.send({"type": "response.create"})
    session.until("response.done")

    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [
        {"type": "output_text", "text": "echo: Be brief.zeroone"}]
    first_request, second_request = fake_service.requests
    assert [m.role for m in first_request.messages] == [pb.ROLE_SYSTEM, pb.ROLE_USER]
    assert prompt_of(first_request) == "Be brief.zeroone"  # the user's items, one message
    assert first_request.sampling.max_new_tokens == 9
    assert first_request.sampling.temperature == pytest.approx(0.5)
    assert first_request.session_id.startswith("realtime-")
    assert [m.role for m in second_request.messages] == [
        pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]
    assert prompt_of(second_request) == "Be brief.zeroecho: Be brief.zeroonetwo"


def test_an_out_of_band_response_answers_its_own_input_and_stays_out(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = echo
    session.say("in the conversation")
    session.send({"type": "response.create", "response": {
        "conversation": "none", "metadata": {"purpose": "summary"},
        "input": [{"type": "message", "role": "user",
                   "content": [{"type": "input_text", "text": "only this"}]}]}})
    events = session.until("response.done")
    session.send({"type": "response.create"})
    session.until("response.done")

    done = events[-1]["response"]
    assert done["conversation_id"] is None and done["metadata"] == {"purpose": "summary"}
    assert "conversation.item.added" not in [event["type"] for event in events]
    out_of_band, in_band = fake_service.requests
    assert prompt_of(out_of_band) == "only this" and not out_of_band.session_id
    assert prompt_of(in_band) == "in the conversation"


BAD_EVENTS = [
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    ({"event_id": "e1"}, "missing_required_parameter", "type"),
    ({"type": "conversation.item.truncate"}, "invalid_value", "type"),
    ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio"),
    ({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()},
     "invalid_value", "audio"),
    ({"type": "input_audio_buffer.append"}, "invalid_value", "audio"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty", None),
    ({"type": "session.update", "session": {"temperature": 3}}, "invalid_value",
     "session.temperature"),
    ({"type": "session.update", "session": {"max_output_tokens": 0}}, "invalid_value",
     "session.max_output_tokens"),
    ({"type": "response.create", "response": {"max_response_output_tokens": "lots"}},
     "invalid_value", "response.max_response_output_tokens"),
    ({"type": "session.update", "session": {"output_modalities": ["audio"]}}, "invalid_value",
     "session.output_modalities"),
    ({"type": "session.update", "session": {"modalities": ["text", "audio"]}},
     "invalid_value", "session.modalities"),
    ({"type": "session.update", "session": {"turn_detection": {
        "type": "server_vad", "threshold": 1.5}}}, "invalid_value",
     "session.turn_detection.threshold"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "prefix_padding_ms": -1}}}}}, "invalid_value",
     "session.audio.input.turn_detection.prefix_padding_ms"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
        "type": "server_vad", "idle_timeout_ms": 5000}}}}}, "invalid_value",
     "session.audio.input.turn_detection.idle_timeout_ms"),
    ({"type": "session.update", "session": {"audio": {"input": {
        "turn_detection": {"type": "semantic_vad"}}}}}, "invalid_value",
     "session.audio.input.turn_detection.type"),
    ({"type": "session.update", "session": {"turn_detection": {"threshold": 0.5}}},
     "missing_required_parameter", "session.turn_detection.type"),
    ({"type": "session.update", "session": {"audio": {"input": {
        "format": {"type": "audio/pcmu"}}}}}, "invalid_value",
     "session.audio.input.format.type"),
    ({"type": "session.update", "session": {"audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 44100}}}}}, "invalid_value",
     "session.audio.input.format.rate"),
    ({"type": "session.update", "session": {"input_audio_format": "g711_ulaw"}},
     "invalid_value", "session.input_audio_format"),
    ({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}},
     "invalid_value", "session.tools"),
    ({"type": "conversation.item.create", "item": {"type": "function_call", "role": "user",
                                                   "content": []}},
     "invalid_value", "item.type"),
    ({"type": "conversation.item.create", "item": {
        "type": "message", "role": "assistant",
        "content": [{"type": "input_audio", "audio": ""}]}}, "invalid_value",
     "item.content[0].type"),
    ({"type": "conversation.item.create", "previous_item_id": "item_x", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
     "item_not_found", "previous_item_id"),
    ({"type": "conversation.item.delete", "item_id": "item_x"}, "item_not_found", "item_id"),
    ({"type": "response.create", "response": {"conversation": "conv_1"}}, "invalid_value",
     "response.conversation"),
    ({"type": "response.create", "response": {"output_modalities": ["audio"]}},
     "invalid_value", "response.output_modalities"),
    ({"type": "response.cancel"}, "response_cancel_not_active", None),
]


@pytest.mark.parametrize(("event", "code", "param"), BAD_EVENTS,
                         ids=[f"{i}-{code}" for i, (_, code, _) in enumerate(BAD_EVENTS)])
def test_a_bad_event_is_an_error_event_and_the_session_goes_on(
        session: Session, fake_service: FakeInferenceService, event, code, param):
    if isinstance(event, dict):
        event = {**event, "event_id": "evt_bad"}
    error = session.error_for(event)

    assert error["type"] == "invalid_request_error"
    assert error["code"] == code and error["param"] == param, error
    assert error["event_id"] == ("evt_bad" if isinstance(event, dict) else None)
    session.say("still here")
    session.send({"type": "response.create"})
    assert session.until("response.done")[-1]["response"]["status"] == "completed"
    # nothing of the bad event stayed: no instructions, no sampling
    assert [m.role for m in fake_service.requests[0].messages] == [pb.ROLE_USER]
    assert fake_service.requests[0].sampling == pb.SamplingParams()


def test_an_upstream_refusal_is_an_error_event_and_a_failed_response(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "KV budget exhausted",
                               trailing_metadata=(("retry-after-ms", "2500"),))
    session.say("hi")
    session.send({"type": "response.create"})
    events = session.until("response.done")

    error, done = events[-2], events[-1]["response"]
    assert error["type"] == "error"
    assert error["error"]["type"] == "rate_limit_error"
    assert error["error"]["message"] == "KV budget exhausted"
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["type"] == "rate_limit_error"
    assert done["output"] == []


def test_an_upstream_error_naming_a_field_names_it_as_param(session: Session):
    session.send({"type": "response.create"})  # nothing to answer: no messages
    events = session.until("response.done")

    assert events[-2]["error"]["type"] == "invalid_request_error"
    assert events[-2]["error"]["param"] == "messages"
    assert events[-1]["response"]["status"] == "failed"


def test_a_failure_mid_reply_keeps_what_came_as_an_incomplete_item(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = fail(grpc.StatusCode.UNAVAILABLE, "shutting down",
                               after_pieces=("Hal", "f"))
    session.say("hi")
    session.send({"type": "response.create"})
    events = session.until("response.done")

    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == \
        ["Hal", "f"]
    item = events[-1]["response"]["output"][0]
    assert item["status"] == "incomplete" and item["content"][0]["text"] == "Half"
    assert events[-2]["error"]["type"] == "server_error"


def test_a_length_limited_reply_is_incomplete(session: Session,
                                               fake_service: FakeInferenceService):
    fake_service.script = reply(["a", "b"], finish_reason=pb.FINISH_REASON_LENGTH)
    session.say("hi")
    session.send({"type": "response.create"})
    done = session.until("response.done")[-1]["response"]

    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["usage"]["input_tokens"] == 11 and done["usage"]["output_tokens"] == 5
    assert done["usage"]["input_token_details"]["cached_tokens"] == 3


def test_response_cancel_stops_the_upstream_call(session: Session,
                                                 fake_service: FakeInferenceService):
    fake_service.script = fake_service.endless()
    session.say("hi")
    session.send({"type": "response.create"})
    created = session.until("response.output_text.delta")[0]
    assert session.error_for({"type": "response.create"})["code"] == \
        "conversation_already_has_active_response"
    session.send({"type": "response.cancel", "response_id": created["response"]["id"]})
    done = session.until("response.done")[-1]["response"]

    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert fake_service.endless_stream_ended.wait(timeout=10)


def test_leaving_mid_reply_cancels_the_upstream_call(gateway_url: str,
                                                     fake_service: FakeInferenceService):
    fake_service.script = fake_service.endless()
    with ws_client.connect(url_of(gateway_url)) as connection:
        session = Session(connection)
        session.say("hi")
        session.send({"type": "response.create"})
        session.until("response.output_text.delta")
        assert not fake_service.endless_stream_ended.is_set()

    assert fake_service.endless_stream_ended.wait(timeout=10)


def refusal(url: str, **options: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        ws_client.connect(url, **options)
    response = info.value.response
    return response.status_code, json.loads(response.body)["error"]


def test_the_model_is_checked_before_the_upgrade(gateway_url: str):
    status, error = refusal(url_of(gateway_url, "?model=gpt-realtime"))
    assert (status, error["code"], error["param"]) == (404, "model_not_found", "model")
    status, error = refusal(url_of(gateway_url, ""))
    assert (status, error["code"], error["param"]) == (400, "missing_required_parameter",
                                                       "model")


def test_the_api_key_is_checked_like_the_http_routes(make_gateway: GatewayFactory,
                                                     fake_service: FakeInferenceService):
    with make_gateway(api_key="sk-test") as url:
        status, error = refusal(url_of(url))
        assert (status, error["code"]) == (401, "invalid_api_key")
        status, _ = refusal(url_of(url), additional_headers={"Authorization": "Bearer no"})
        assert status == 401
        # the SDK sends the key as a Bearer header
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0)
        with client.realtime.connect(model=MODEL) as connection:
            assert connection.recv().type == "session.created"
        # a browser cannot set headers: it offers the key as a subprotocol
        with ws_client.connect(url_of(url), subprotocols=[
                "realtime", "openai-insecure-api-key.sk-test"]) as connection:
            assert connection.subprotocol == "realtime"
            assert Session(connection).created["type"] == "session.created"


def test_the_input_buffer_holds_at_most_two_minutes(session: Session):
    minute = base64.b64encode(bytes(2 * 24_000 * 60)).decode()
    for _ in range(2):
        session.send({"type": "input_audio_buffer.append", "audio": minute})
    error = session.error_for({"type": "input_audio_buffer.append", "event_id": "evt_more",
                               "audio": base64.b64encode(bytes(2 * 240)).decode()})
    assert (error["code"], error["param"], error["event_id"]) == (
        "input_audio_buffer_too_large", "audio", "evt_more")
    session.send({"type": "input_audio_buffer.clear"})
    assert session.recv()["type"] == "input_audio_buffer.cleared"
    session.send({"type": "input_audio_buffer.append", "audio": minute})
    session.send({"type": "input_audio_buffer.commit"})
    assert session.recv()["type"] == "input_audio_buffer.committed"


def test_the_input_rate_cannot_change_under_buffered_audio(session: Session):
    session.send({"type": "input_audio_buffer.append",
                  "audio": base64.b64encode(bytes(4800)).decode()})
    error = session.error_for({"type": "session.update", "session": {"audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16000}}}}})
    assert (error["code"], error["param"]) == ("invalid_value", "session.audio.input.format")


# server_vad turn detection: speech found in the appended audio, which a test builds from
# tones and silence at 16 kHz (or 24 kHz), so that every boundary falls on a 20 ms frame
VAD_DEFAULTS = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": 500, "create_response": True,
                "interrupt_response": True}
GA_VAD_TURN = [
    "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
    "response.created", "response.output_item.added", "conversation.item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
    "response.output_text.done", "response.content_part.done", "response.output_item.done",
    "conversation.item.done", "response.done",
]


def tone(seconds: float, dbfs: float = -10.0, rate: int = 16_000) -> bytes:
    """A 400 Hz sine whose RMS level is `dbfs`."""
    t = np.arange(round(seconds * rate)) / rate
    peak = 10 ** (dbfs / 20) * np.sqrt(2) * 32767
    return (np.sin(2 * np.pi * 400 * t) * peak).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 16_000) -> bytes:
    return bytes(2 * round(seconds * rate))


def at_ms(ms: int) -> int:
    """The byte offset of `ms` in 16 kHz s16le audio."""
    return ms * 32


def detect_turns(session: Session, **fields: Any) -> dict[str, Any]:
    """Turn server_vad on (GA, 16 kHz input); the session.updated event."""
    session.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 16_000},
        "turn_detection": {"type": "server_vad", **fields}}}}})
    return session.recv()


def append(session: Session, pcm: bytes, chunk_ms: int = 100, rate: int = 16_000) -> None:
    size = 2 * rate * chunk_ms // 1000
    for start in range(0, len(pcm), size):
        session.send({"type": "input_audio_buffer.append",
                      "audio": base64.b64encode(pcm[start:start + size]).decode()})


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in events]


def test_speech_then_silence_is_detected_committed_and_answered(
        session: Session, fake_service: FakeInferenceService):
    updated = detect_turns(session)
    audio = silence(1.0) + tone(0.4) + silence(1.0)
    append(session, audio)
    events = session.until("response.done")

    assert updated["session"]["audio"]["input"]["turn_detection"] == VAD_DEFAULTS
    assert kinds(events) == GA_VAD_TURN
    started, stopped, committed = events[:3]
    # the padding reaches 300 ms back; the item ends with the 500 ms of silence
    assert started["audio_start_ms"] == 700 and stopped["audio_end_ms"] == 1900
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == \
        events[3]["item"]["id"]
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "Hello, world"
    (request,) = fake_service.requests
    assert audio_of(request) == [audio[at_ms(700):at_ms(1900)]]


def test_silence_alone_starts_no_turn_and_only_the_padding_is_kept(
        session: Session, fake_service: FakeInferenceService):
    detect_turns(session)
    hum = np.random.default_rng(0).normal(0, 10 ** (-50 / 20) * 32767, 16_000)  # -50 dBFS
    audio = silence(2.0) + hum.astype("<i2").tobytes()
    append(session, audio)
    session.send({"type": "input_audio_buffer.commit"})
    assert session.recv()["type"] == "input_audio_buffer.committed"  # nothing before it
    session.send({"type": "response.create"})
    session.until("response.done")

    (kept,) = audio_of(fake_service.requests[0])
    assert at_ms(300) <= len(kept) <= at_ms(320)  # the padding and a partial frame
    assert audio.endswith(kept)


@pytest.mark.parametrize(("threshold", "dbfs", "heard"), [
    (0.5, -30, True), (0.5, -50, False), (0.75, -30, False), (0.75, -10, True),
    (0.25, -50, True)])
def test_the_threshold_is_the_level_speech_must_reach(
        session: Session, threshold: float, dbfs: float, heard: bool):
    detect_turns(session, threshold=threshold, create_response=False)
    append(session, tone(0.3, dbfs) + silence(0.6))
    session.send({"type": "input_audio_buffer.commit"})
    events = session.until("input_audio_buffer.committed")

    # the level is 80 * (threshold - 1) dBFS: -40 at 0.5, -20 at 0.75, -60 at 0.25
    assert kinds(events) == (["input_audio_buffer.speech_started",
                              "input_audio_buffer.speech_stopped",
                              "input_audio_buffer.committed"] if heard
                             else ["input_audio_buffer.committed"])


def test_a_pause_shorter_than_the_silence_duration_stays_in_the_turn(
        session: Session, fake_service: FakeInferenceService):
    detect_turns(session, silence_duration_ms=400, prefix_padding_ms=200,
                 create_response=False)
    # a pause of 300 ms goes on with the turn, one of 500 ms ends it 400 ms in
    audio = (silence(0.5) + tone(0.2) + silence(0.3) + tone(0.2) + silence(0.5) + tone(0.2)
             + silence(0.6))
    append(session, audio)
    events = session.until("input_audio_buffer.committed")
    events += session.until("input_audio_buffer.committed")
    session.send({"type": "response.create"})
    session.until("response.done")

    started = [e for e in events if e["type"] == "input_audio_buffer.speech_started"]
    stopped = [e for e in events if e["type"] == "input_audio_buffer.speech_stopped"]
    assert [e["audio_start_ms"] for e in started] == [300, 1600]  # padding up to turn 1
    assert [e["audio_end_ms"] for e in stopped] == [1600, 2300]
    assert audio_of(fake_service.requests[0]) == [audio[at_ms(300):at_ms(1600)],
                                                  audio[at_ms(1600):at_ms(2300)]]


def test_speech_during_a_response_cancels_it_and_is_the_next_turn(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = fake_service.endless()
    detect_turns(session)
    audio = tone(0.3) + silence(0.6) + tone(0.3) + silence(0.6)
    append(session, audio[:at_ms(900)])
    session.until("response.output_text.delta")
    fake_service.script = reply(["Again"])
    append(session, audio[at_ms(900):at_ms(1200)])
    interrupted = session.until("response.done")
    assert fake_service.endless_stream_ended.wait(timeout=10)
    append(session, audio[at_ms(1200):])
    second = session.until("response.done")

    assert "input_audio_buffer.speech_started" in kinds(interrupted)
    assert interrupted[-1]["response"]["status_details"] == {"type": "cancelled",
                                                             "reason": "turn_detected"}
    assert kinds(second)[:2] == ["input_audio_buffer.speech_stopped",
                                 "input_audio_buffer.committed"]
    assert second[-1]["response"]["status"] == "completed"
    request = fake_service.requests[-1]
    assert [m.role for m in request.messages] == [pb.ROLE_USER, pb.ROLE_ASSISTANT,
                                                  pb.ROLE_USER]
    assert prompt_of(request).startswith("tok ")  # what the cancelled response said
    # the second turn's padding stops where the first turn ended
    assert audio_of(request) == [audio[:at_ms(800)], audio[at_ms(800):at_ms(1700)]]


def test_one_append_holding_two_utterances_is_two_turns_and_cuts_the_first_answer(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = fake_service.gated("first", " second")  # answers wait for release
    detect_turns(session)
    audio = tone(0.3) + silence(0.6) + tone(0.3) + silence(0.6)
    append(session, audio, chunk_ms=2000)
    first = session.until("response.done")
    second = session.until("response.output_text.delta")
    fake_service.released.set()
    second += session.until("response.done")

    assert first[-1]["response"]["status_details"] == {"type": "cancelled",
                                                       "reason": "turn_detected"}
    assert second[-1]["response"]["status"] == "completed"
    assert [kind for kind in kinds(first + second) if kind.startswith("input_audio")] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed"] * 2
    assert [audio[:at_ms(800)], audio[at_ms(800):at_ms(1700)]] in [
        audio_of(request) for request in fake_service.requests]


def test_without_interrupt_response_speech_during_a_response_waits_for_response_create(
        session: Session, fake_service: FakeInferenceService):
    fake_service.script = fake_service.gated("first", " second")
    detect_turns(session, interrupt_response=False)
    append(session, tone(0.3) + silence(0.6))
    session.until("response.output_text.delta")
    append(session, tone(0.3) + silence(0.6))
    spoken = session.until("conversation.item.done")
    fake_service.released.set()
    done = session.until("response.done")[-1]["response"]
    session.send({"type": "response.create"})
    answer = session.until("response.done")

    assert kinds(spoken) == ["input_audio_buffer.speech_started",
                             "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added",
                             "conversation.item.done"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0]["text"] == "first second"
    assert answer[0]["type"] == "response.created"  # no response of its own came before
    assert [m.role for m in fake_service.requests[-1].messages] == [
        pb.ROLE_USER, pb.ROLE_ASSISTANT, pb.ROLE_USER]


def test_the_beta_dialect_sets_turn_detection_on_the_session(
        gateway_url: str, fake_service: FakeInferenceService):
    with ws_client.connect(url_of(gateway_url),
                           additional_headers={"OpenAI-Beta": "realtime=v1"}) as connection:
        session = Session(connection)
        session.send({"type": "session.update", "session": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}})
        updated = session.recv()
        append(session, tone(0.4, rate=24_000) + silence(0.5, rate=24_000), rate=24_000)
        events = session.until("response.done")

    assert updated["session"]["turn_detection"] == {**VAD_DEFAULTS, "silence_duration_ms": 300}
    assert kinds(events)[:5] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed", "conversation.item.created", "response.created"]
    assert "response.text.delta" in kinds(events)
    assert events[1]["audio_end_ms"] == 700


def test_turn_detection_cannot_change_while_speech_is_buffered(session: Session):
    detect_turns(session)
    append(session, tone(0.3))
    assert session.recv()["type"] == "input_audio_buffer.speech_started"
    error = session.error_for({"type": "session.update", "session": {
        "audio": {"input": {"turn_detection": None}}}})
    session.send({"type": "input_audio_buffer.clear"})
    assert session.recv()["type"] == "input_audio_buffer.cleared"
    session.send({"type": "session.update", "session": {
        "audio": {"input": {"turn_detection": None}}}})
    updated = session.recv()

    assert (error["code"], error["param"]) == ("invalid_value",
                                               "session.audio.input.turn_detection")
    assert updated["session"]["audio"]["input"]["turn_detection"] is None


def test_speech_that_never_falls_silent_is_cut_at_the_longest_buffer(
        session: Session, fake_service: FakeInferenceService):
    detect_turns(session, prefix_padding_ms=0, create_response=False)
    audio = tone(121.0)
    append(session, audio, chunk_ms=10_000)
    events = session.until("conversation.item.done")
    events.append(session.recv())
    session.send({"type": "response.create"})
    session.until("response.done")

    assert kinds(events) == ["input_audio_buffer.speech_started",
                             "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added",
                             "conversation.item.done", "input_audio_buffer.speech_started"]
    assert events[1]["audio_end_ms"] == events[5]["audio_start_ms"] == 120_000
    assert audio_of(fake_service.requests[0]) == [audio[:at_ms(120_000)]]
