"""/v1/realtime through the `openai` SDK's Realtime clients (GA and beta), a real gateway
and the real service (tiny model): speech appended in pieces reaches the service while it
is spoken, and the text answer is the one Generate gives for the same conversation."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import openai
import pytest
from gateway_harness import running_gateway

from autoglm.inference.v1 import inference_service_pb2 as pb
from gateway.config import GatewayConfig
from gateway.resample import resample
from tests.conftest import ServerProcess, start_server
from tests.inference_svc.test_metrics import free_port, scrape
from tests.support.polling import wait_until

MODEL = "autoglm-phone-9b"
SERVICE_MODEL = (("model_name", MODEL),)
INSTRUCTIONS = "Answer in one word."
IDLE_TIMEOUT_S = 3.0
GREEDY = {"temperature": 0, "max_output_tokens": 8}
GA_SESSION = {"type": "realtime", "instructions": INSTRUCTIONS, "output_modalities": ["text"],
              **GREEDY}
# the event stream of one turn, text deltas shown once
GA_TURN = [
    "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
    "response.created", "response.output_item.added", "conversation.item.added",
    "response.content_part.added", "response.output_text.delta", "response.output_text.done",
    "response.content_part.done", "response.output_item.done", "conversation.item.done",
    "response.done",
]
BETA_TURN = [
    "input_audio_buffer.committed", "conversation.item.created", "response.created",
    "response.output_item.added", "conversation.item.created", "response.content_part.added",
    "response.text.delta", "response.text.done", "response.content_part.done",
    "response.output_item.done", "response.done",
]


@pytest.fixture(scope="module")
def metered(tiny_bundle, tmp_path_factory) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("realtime"), tiny_bundle,
                          "--metrics-port", str(port),
                          "--live-audio-idle-timeout", str(IDLE_TIMEOUT_S))
    yield server, port
    server.terminate()


@pytest.fixture(scope="module")
def server(metered) -> ServerProcess:
    return metered[0]


@pytest.fixture(scope="module")
def gateway(server) -> Iterator[str]:
    with running_gateway(GatewayConfig(upstream_target=server.target)) as url:
        yield url


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    port = gateway.rsplit(":", 1)[1]
    # the beta client goes to wss:// unless told the WebSocket address
    return openai.OpenAI(base_url=f"{gateway}/v1", websocket_base_url=f"ws://127.0.0.1:{port}/v1",
                         api_key="EMPTY", max_retries=0)


@contextmanager
def ga_session(client: openai.OpenAI) -> Iterator:
    """A Realtime connection past its session.created and its GA session's update."""
    with client.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.session.update(session=GA_SESSION)
        connection.recv()
        yield connection


def speech(seconds: float, frequency: float = 330.0) -> bytes:
    """A tone at OpenAI's pcm16 rate (24 kHz)."""
    t = np.arange(int(seconds * 24_000)) / 24_000
    return (np.sin(2 * np.pi * frequency * t) * 0.4 * 32767).astype("<i2").tobytes()


def pieces(pcm: bytes, count: int) -> list[str]:
    size = -(-len(pcm) // count // 2) * 2
    return [base64.b64encode(pcm[i:i + size]).decode() for i in range(0, len(pcm), size)]


def turn_events(connection: Any) -> list[Any]:
    """Events up to and including response.done."""
    events = []
    while not events or events[-1].type != "response.done":
        events.append(connection.recv())
    return events


def shape(events: list[Any]) -> list[str]:
    kinds: list[str] = []
    for event in events:
        if not (kinds and kinds[-1] == event.type and event.type.endswith(".delta")):
            kinds.append(event.type)
    return kinds


def text_of(events: list[Any]) -> str:
    return "".join(event.delta for event in events if event.type.endswith("text.delta"))


def said(pcm_24k: bytes) -> pb.Part:
    return pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(
        data=resample(pcm_24k, 24_000, 16_000), sample_rate_hz=16_000,
        encoding=pb.PCM_ENCODING_S16LE)))


def generate(stub, messages: list[pb.Message], instructions: str = INSTRUCTIONS
             ) -> tuple[str, pb.FinalMessage]:
    system = pb.Message(role=pb.ROLE_SYSTEM, parts=[pb.Part(text=instructions)])
    request = pb.GenerateRequest(messages=[system, *messages],
                                 sampling=pb.SamplingParams(temperature=0, max_new_tokens=8))
    replies = list(stub.Generate(request))
    return "".join(reply.text_delta for reply in replies), replies[-1].final


def user(*parts: pb.Part) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=list(parts))


def assistant(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text=text)])


def received_seconds(port: int) -> float:
    return scrape(port)[("autoglm_live_audio_received_seconds_total", SERVICE_MODEL)]


def open_streams(port: int) -> float:
    return scrape(port)[("autoglm_live_audio_streams_open", SERVICE_MODEL)]


def refused_live_calls(port: int) -> float:
    method = "/autoglm.inference.v1.InferenceService/GenerateLive"
    return scrape(port).get(
        ("autoglm_rpcs_total", (("code", "INVALID_ARGUMENT"), ("method", method))), 0.0)


def gateway_live_streams(gateway: str) -> float:
    return scrape(int(gateway.rsplit(":", 1)[1]))[("autoglm_gateway_realtime_live_streams", ())]


def responses_by_path(gateway: str, path: str) -> float:
    port = int(gateway.rsplit(":", 1)[1])
    return sum(value for (name, labels), value in scrape(port).items()
               if name == "autoglm_gateway_realtime_responses_total"
               and dict(labels)["path"] == path)


def wait_for_responses(gateway: str, path: str, count: float) -> None:
    """The gateway counts a response just after its response.done has gone out."""
    wait_until(lambda: responses_by_path(gateway, path) == count, 30,
               f"{count:g} responses by {path}")


def assert_answers_as_generate(events: list[Any], text: str, final: pb.FinalMessage) -> None:
    done = events[-1].response
    assert text_of(events) == text
    assert done.output[0].content[0].text == text
    assert done.status == ("incomplete" if final.finish_reason == pb.FINISH_REASON_LENGTH
                           else "completed")
    assert done.usage.input_tokens == final.usage.prompt_tokens
    assert done.usage.input_token_details.audio_tokens == final.usage.audio_tokens > 0
    assert done.usage.output_tokens == final.usage.completion_tokens
    assert done.usage.total_tokens == final.usage.prompt_tokens + final.usage.completion_tokens


def test_speech_reaches_the_service_while_spoken_and_is_answered_as_generate_would(
        client, stub, metered, gateway):
    _, port = metered
    pcm = speech(1.0)
    received, live = received_seconds(port), responses_by_path(gateway, "live")
    with client.realtime.connect(model=MODEL) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session=GA_SESSION)
        updated = connection.recv()
        assert updated.type == "session.updated"
        assert updated.session.instructions == INSTRUCTIONS
        assert updated.session.audio.input.format.rate == 24_000
        for piece in pieces(pcm, 5):
            connection.input_audio_buffer.append(audio=piece)
        # before the commit, all but the last partial 100 ms chunk is at the service
        wait_until(lambda: received_seconds(port) >= received + 0.85, 30,
                   "the speech streamed before the commit")
        assert open_streams(port) == 1
        assert gateway_live_streams(gateway) == 1
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = turn_events(connection)

    assert shape(events) == GA_TURN
    assert_answers_as_generate(events, *generate(stub, [user(said(pcm))]))
    assert received_seconds(port) == pytest.approx(received + 1.0)
    wait_for_responses(gateway, "live", live + 1)
    committed, user_item = events[0], events[1].item
    assert user_item.id == committed.item_id and user_item.role == "user"
    assert user_item.content[0].type == "input_audio"


def test_the_next_turn_carries_the_conversation_and_reuses_its_cached_state(
        client, stub, gateway):
    first, second = speech(0.6), speech(0.5, frequency=520)
    live = responses_by_path(gateway, "live")
    with ga_session(client) as connection:
        turns = []
        for pcm in (first, second):
            for piece in pieces(pcm, 3):
                connection.input_audio_buffer.append(audio=piece)
            connection.input_audio_buffer.commit()
            connection.response.create()
            turns.append(turn_events(connection))

    first_text, _ = generate(stub, [user(said(first))])
    text, final = generate(stub, [user(said(first)), assistant(first_text), user(said(second))])
    assert text_of(turns[0]) == first_text
    assert_answers_as_generate(turns[1], text, final)
    assert turns[1][-1].response.usage.input_token_details.cached_tokens > 0
    wait_for_responses(gateway, "live", live + 2)


def test_the_beta_client_gets_the_beta_events_and_the_same_answer(client, stub):
    pcm = speech(0.8)
    with client.beta.realtime.connect(model=MODEL) as connection:
        created = connection.recv()
        assert created.type == "session.created"
        assert created.session.input_audio_format == "pcm16"
        connection.session.update(session={
            "modalities": ["text"], "instructions": INSTRUCTIONS, "input_audio_format": "pcm16",
            "turn_detection": None, "temperature": 0, "max_response_output_tokens": 8})
        assert connection.recv().type == "session.updated"
        for piece in pieces(pcm, 4):
            connection.input_audio_buffer.append(audio=piece)
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = turn_events(connection)

    assert shape(events) == BETA_TURN
    assert_answers_as_generate(events, *generate(stub, [user(said(pcm))]))


def test_a_response_asking_for_other_settings_sends_the_conversation_whole(
        client, stub, gateway):
    pcm = speech(0.5)
    whole = responses_by_path(gateway, "generate")
    with ga_session(client) as connection:
        connection.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "Listen:"}]})
        for piece in pieces(pcm, 2):
            connection.input_audio_buffer.append(audio=piece)
        connection.input_audio_buffer.commit()
        connection.response.create(response={"instructions": "Say it twice."})
        events = turn_events(connection)[4:]  # after the text item's and the audio's events

    expected = generate(stub, [user(pb.Part(text="Listen:"), said(pcm))], "Say it twice.")
    assert_answers_as_generate(events, *expected)
    wait_for_responses(gateway, "generate", whole + 1)


def test_speech_after_the_service_gave_up_waiting_is_sent_again_and_streams_on(
        client, stub, metered, gateway):
    _, port = metered
    before, after = speech(0.3), speech(0.4, frequency=440)
    live = responses_by_path(gateway, "live")
    with ga_session(client) as connection:
        connection.input_audio_buffer.append(audio=pieces(before, 1)[0])
        wait_until(lambda: open_streams(port) == 1, 30, "the live stream open")
        # the user pauses past the service's idle timeout: it ends the stream
        wait_until(lambda: open_streams(port) == 0, 3 * IDLE_TIMEOUT_S + 30,
                   "the idle stream ended by the service")
        connection.input_audio_buffer.append(audio=pieces(after, 1)[0])
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = turn_events(connection)

    assert_answers_as_generate(events, *generate(stub, [user(said(before + after))]))
    wait_for_responses(gateway, "live", live + 1)


def test_leaving_mid_speech_cancels_the_live_stream(client, metered, gateway):
    _, port = metered
    with client.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.input_audio_buffer.append(audio=pieces(speech(0.3), 1)[0])
        wait_until(lambda: open_streams(port) == 1, 30, "the live stream open")
    wait_until(lambda: open_streams(port) == 0, 30, "the live stream cancelled")
    wait_until(lambda: gateway_live_streams(gateway) == 0, 30, "the gateway's call ended")


def test_a_live_stream_the_service_refused_still_gets_its_answer_through_generate(
        server, stub, metered):
    _, port = metered
    pcm = speech(1.2)
    # chunks of 1 s: past the service's 500 ms, so it refuses the live stream
    with running_gateway(GatewayConfig(upstream_target=server.target,
                                       realtime_chunk_ms=1000)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0)
        with ga_session(client) as connection:
            refused = refused_live_calls(port)
            connection.input_audio_buffer.append(audio=pieces(pcm, 1)[0])
            wait_until(lambda: refused_live_calls(port) == refused + 1, 30,
                       "the service refused the live stream")
            wait_until(lambda: gateway_live_streams(url) == 0, 30,
                       "the gateway saw the live stream end")
            connection.input_audio_buffer.commit()
            connection.response.create()
            events = turn_events(connection)
        wait_for_responses(url, "generate", 1)

    assert_answers_as_generate(events, *generate(stub, [user(said(pcm))]))


def test_an_audio_item_created_whole_is_answered_as_generate_would(client, stub):
    pcm = speech(0.7)
    with ga_session(client) as connection:
        connection.conversation.item.create(item={
            "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": pieces(pcm, 1)[0]}]})
        connection.response.create()
        events = turn_events(connection)[2:]  # after the item's added and done

    assert_answers_as_generate(events, *generate(stub, [user(said(pcm))]))


def test_16_khz_speech_goes_to_the_service_as_it_is(client, stub, gateway):
    t = np.arange(12_000) / 16_000
    pcm = (np.sin(2 * np.pi * 300 * t) * 0.4 * 32767).astype("<i2").tobytes()
    live = responses_by_path(gateway, "live")
    with client.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.session.update(session={
            **GA_SESSION, "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16_000}}}})
        assert connection.recv().session.audio.input.format.rate == 16_000
        for piece in pieces(pcm, 3):
            connection.input_audio_buffer.append(audio=piece)
        connection.input_audio_buffer.commit()
        connection.response.create()
        events = turn_events(connection)

    as_sent = pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=pcm, sample_rate_hz=16_000,
                                                     encoding=pb.PCM_ENCODING_S16LE)))
    assert_answers_as_generate(events, *generate(stub, [user(as_sent)]))
    wait_for_responses(gateway, "live", live + 1)


GA_VAD_SESSION = {**GA_SESSION, "audio": {"input": {"turn_detection": {"type": "server_vad"}}}}
SPEECH_EVENTS = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"]


def quiet(seconds: float) -> bytes:
    return bytes(2 * int(seconds * 24_000))


def part_of(stream: bytes, started: Any, stopped: Any) -> pb.Part:
    """What a detected turn holds of the 24 kHz `stream` appended since the session began,
    at the service's 16 kHz."""
    data = resample(stream, 24_000, 16_000)[32 * started.audio_start_ms:
                                            32 * stopped.audio_end_ms]
    return pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=data, sample_rate_hz=16_000,
                                                  encoding=pb.PCM_ENCODING_S16LE)))


def test_server_vad_ends_the_turn_itself_and_answers_as_generate_would(
        client, stub, metered, gateway):
    _, port = metered
    stream = quiet(1.0) + speech(0.8, frequency=520) + quiet(0.8)
    received, live = received_seconds(port), responses_by_path(gateway, "live")
    with client.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.session.update(session=GA_VAD_SESSION)
        updated = connection.recv()
        for piece in pieces(stream, 26):  # no commit, no response.create
            connection.input_audio_buffer.append(audio=piece)
        events = turn_events(connection)

    assert updated.session.audio.input.turn_detection.type == "server_vad"
    assert shape(events) == SPEECH_EVENTS + GA_TURN  # with text deltas
    started, stopped = events[:2]
    # 300 ms of padding before the speech, the 500 ms of silence that ended it after
    assert (started.audio_start_ms, stopped.audio_end_ms) == (700, 2300)
    assert_answers_as_generate(events, *generate(stub, [user(part_of(stream, started, stopped))]))
    # the turn went to the service while spoken, the silence before the padding never did
    assert received_seconds(port) == pytest.approx(received + 1.6)
    wait_for_responses(gateway, "live", live + 1)


def test_server_vad_takes_no_turn_from_silence_and_a_second_turn_carries_the_first(
        client, stub, metered):
    _, port = metered
    stream = quiet(2.0)
    received = received_seconds(port)
    with client.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.session.update(session=GA_VAD_SESSION)
        connection.recv()
        for piece in pieces(stream, 20):
            connection.input_audio_buffer.append(audio=piece)
        connection.session.update(session=GA_VAD_SESSION)
        assert connection.recv().type == "session.updated"  # nothing came before it
        turns = []
        for pcm in (speech(0.6, frequency=520), speech(0.5)):
            stream += pcm + quiet(0.7)
            for piece in pieces(pcm + quiet(0.7), 6):
                connection.input_audio_buffer.append(audio=piece)
            turns.append(turn_events(connection))

    first, second = (part_of(stream, *turn[:2]) for turn in turns)
    first_text, _ = generate(stub, [user(first)])
    second_text, final = generate(stub, [user(first), assistant(first_text), user(second)])
    assert shape(turns[0]) == SPEECH_EVENTS + GA_TURN
    assert text_of(turns[0]) == first_text
    # the tiny model's second answer may be tokens that decode to no text: no delta then
    assert shape(turns[1]) == SPEECH_EVENTS + [
        kind for kind in GA_TURN if second_text or not kind.endswith(".delta")]
    assert_answers_as_generate(turns[1], second_text, final)
    assert turns[1][-1].response.usage.input_token_details.cached_tokens > 0
    spoken_ms = sum(turn[1].audio_end_ms - turn[0].audio_start_ms for turn in turns)
    assert received_seconds(port) == pytest.approx(received + spoken_ms / 1000)


def test_the_beta_client_sets_server_vad_on_the_session(client, stub):
    stream = quiet(0.5) + speech(0.6, frequency=520) + quiet(0.6)
    with client.beta.realtime.connect(model=MODEL) as connection:
        connection.recv()
        connection.session.update(session={
            "modalities": ["text"], "instructions": INSTRUCTIONS, "temperature": 0,
            "max_response_output_tokens": 8, "turn_detection": {"type": "server_vad"}})
        updated = connection.recv()
        for piece in pieces(stream, 8):
            connection.input_audio_buffer.append(audio=piece)
        events = turn_events(connection)

    assert updated.session.turn_detection.type == "server_vad"
    assert updated.session.turn_detection.silence_duration_ms == 500
    assert shape(events) == SPEECH_EVENTS + BETA_TURN
    assert_answers_as_generate(events, *generate(stub, [user(part_of(stream, *events[:2]))]))
