"""GenerateLive over a real channel against a real server (tiny model): the utterance
streamed in chunks answers as the same clip sent whole through Generate; every protocol
or bound violation ends with its status naming the field; a stall, a cancel and the
metrics."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.conftest import ServerProcess, start_server
from tests.inference_svc.test_metrics import free_port, scrape
from tests.support.polling import wait_until

RATE = 16_000
IDLE_TIMEOUT_S = 2.0
MAX_UTTERANCE_S = 2.0
S16 = pb.LiveAudioFormat(sample_rate_hz=RATE, encoding=pb.PCM_ENCODING_S16LE)
F32 = pb.LiveAudioFormat(sample_rate_hz=RATE, encoding=pb.PCM_ENCODING_F32LE)
GREEDY = pb.SamplingParams(max_new_tokens=8, min_new_tokens=1, temperature=0.0)
LIVE = "/autoglm.inference.v1.InferenceService/GenerateLive"


@pytest.fixture(scope="module")
def metered(tiny_bundle, tmp_path_factory) -> Iterator[tuple[ServerProcess, int]]:
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("live"), tiny_bundle,
                          "--metrics-port", str(port),
                          "--live-audio-idle-timeout", str(IDLE_TIMEOUT_S),
                          "--live-audio-max-utterance", str(MAX_UTTERANCE_S))
    yield server, port
    server.terminate()


@pytest.fixture(scope="module")
def server(metered) -> ServerProcess:
    return metered[0]


def samples(seconds: float, encoding: str = "s16le") -> bytes:
    wave = np.sin(np.arange(int(seconds * RATE)) * 2 * np.pi * 330 / RATE) * 0.4
    if encoding == "f32le":
        return wave.astype("<f4").tobytes()
    return (wave * 32767).astype("<i2").tobytes()


def chunked(pcm: bytes, chunk_ms: int, width: int = 2) -> list[bytes]:
    size = RATE * chunk_ms // 1000 * width
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


def user(*parts: pb.Part) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, parts=list(parts))


def start(messages: Iterable[pb.Message] = (user(pb.Part(text="What is said?")),),
          fmt: pb.LiveAudioFormat = S16, **fields) -> pb.GenerateLiveRequest:
    request = pb.GenerateRequest(messages=list(messages), sampling=GREEDY, **fields)
    return pb.GenerateLiveRequest(start=pb.GenerateLiveStart(request=request, format=fmt))


def audio(data: bytes) -> pb.GenerateLiveRequest:
    return pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=data))


END = pb.GenerateLiveRequest(end=pb.LiveAudioEnd())


def utterance(first: pb.GenerateLiveRequest, chunks: Iterable[bytes]
              ) -> list[pb.GenerateLiveRequest]:
    return [first, *(audio(c) for c in chunks), END]


def reply(responses: Iterable[pb.GenerateResponse]) -> tuple[str, pb.FinalMessage]:
    responses = list(responses)
    assert [r.HasField("final") for r in responses][-1]
    return "".join(r.text_delta for r in responses), responses[-1].final


def field_of(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    return info.metadata["field"]


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value


@pytest.mark.parametrize("encoding", ["s16le", "f32le"])
@pytest.mark.parametrize("last_role", ["user", "assistant"])
def test_streamed_clip_answers_as_the_whole_clip_through_generate(stub, encoding, last_role):
    pcm = samples(1.0, encoding)
    width, fmt = (2, S16) if encoding == "s16le" else (4, F32)
    history = [user(pb.Part(text="Listen."))]
    if last_role == "assistant":
        history.append(pb.Message(role=pb.ROLE_ASSISTANT, parts=[pb.Part(text="Go on.")]))
    whole = pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=pcm, sample_rate_hz=RATE,
                                                   encoding=fmt.encoding)))
    # the audio ends the user's last message, or is a new user message after the model's
    messages = ([user(*history[0].parts, whole)] if last_role == "user"
                else [*history, user(whole)])

    live_text, live = reply(stub.GenerateLive(iter(utterance(
        start(history, fmt), chunked(pcm, 100, width)))))
    text, final = reply(stub.Generate(pb.GenerateRequest(messages=messages, sampling=GREEDY)))

    assert live_text == text
    assert live.finish_reason == final.finish_reason
    assert live.usage.audio_tokens == final.usage.audio_tokens > 0
    assert live.usage.prompt_tokens == final.usage.prompt_tokens
    assert live.usage.completion_tokens == final.usage.completion_tokens
    assert live.usage.audio_seconds == pytest.approx(1.0)
    assert final.usage.audio_seconds == 0


def test_a_short_last_chunk_is_fine(stub):
    chunks = [samples(0.1), samples(0.1), samples(0.004)]  # the last one 4 ms
    _, final = reply(stub.GenerateLive(iter(utterance(start(), chunks))))
    assert final.usage.audio_seconds == pytest.approx(0.204)


@pytest.mark.parametrize(("messages", "field", "fragment"), [
    ([audio(samples(0.1)), END], "start", "first message must be start"),
    ([start(fmt=pb.LiveAudioFormat(sample_rate_hz=8000, encoding=pb.PCM_ENCODING_S16LE))],
     "start.format.sample_rate_hz", "must be 16000"),
    ([start(fmt=pb.LiveAudioFormat(sample_rate_hz=RATE))], "start.format.encoding",
     "PCM_ENCODING_S16LE"),
    ([start(), audio(samples(0.1) + b"\0"), END], "audio.data", "whole number"),
    ([start(fmt=F32), audio(samples(0.1, "f32le")[:-2]), END], "audio.data", "whole number"),
    ([start(), audio(samples(0.6)), END], "audio.data", "longer than 500 ms"),
    ([start(), audio(b""), END], "audio.data", "empty"),
    ([start(), audio(samples(0.005)), audio(samples(0.1)), END], "audio.data",
     "shorter than 10 ms"),
    ([start(), audio(samples(0.1)), start(), END], "start", "second start"),
    ([start(), *[audio(samples(0.5))] * 5, END], "audio", "passes 2 s"),
    ([start(), END], "audio", "before any audio"),
    ([start(), audio(samples(0.1))], "end", "before end"),
    ([start(), pb.GenerateLiveRequest(), END], "message", "empty"),
    ([start(messages=[pb.Message(parts=[pb.Part(text="x")])]), audio(samples(0.1)), END],
     "messages[0].role", "role"),
], ids=["audio-first", "rate", "encoding", "partial-s16", "partial-f32", "oversize-chunk",
        "empty-chunk", "short-chunk-not-last", "second-start", "past-max-utterance",
        "no-audio", "closed-before-end", "empty-message", "bad-conversation"])
def test_each_violation_is_invalid_argument_naming_the_field(stub, messages, field, fragment):
    error = error_of(stub.GenerateLive(iter(messages)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == field
    assert fragment in error.details()


class Held:
    """A request stream that sends `messages`, then waits until released (a stalled
    client, or one that is still speaking)."""

    def __init__(self, messages: list[pb.GenerateLiveRequest]) -> None:
        self.messages = messages
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.GenerateLiveRequest]:
        yield from self.messages
        self.release.wait(60)


def test_a_chunk_after_end_is_invalid_argument_and_stops_the_reply(stub, control):
    long_reply = pb.SamplingParams(max_new_tokens=20000, min_new_tokens=20000)
    first = start()
    first.start.request.sampling.CopyFrom(long_reply)
    error = error_of(stub.GenerateLive(iter([first, audio(samples(0.1)), END,
                                              audio(samples(0.1))])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert field_of(error) == "audio"
    assert "follows end" in error.details()
    wait_until(lambda: not control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status.requests,
               30, "the stopped reply's request gone")


def test_a_stalled_client_gets_deadline_exceeded(stub):
    held = Held([start(), audio(samples(0.1))])
    try:
        error = error_of(stub.GenerateLive(iter(held)))
    finally:
        held.release.set()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--live-audio-idle-timeout" in error.details()


MODEL = (("model_name", "autoglm-phone-9b"),)


def open_streams(port: int) -> float:
    return scrape(port)[("autoglm_live_audio_streams_open", MODEL)]


def received_seconds(port: int) -> float:
    return scrape(port)[("autoglm_live_audio_received_seconds_total", MODEL)]


def encoded_chunks(port: int) -> float:
    return scrape(port)[("autoglm_live_audio_chunk_encode_seconds_count", MODEL)]


def test_cancel_mid_utterance_leaves_the_kv_account_as_it_was(stub, control, metered):
    _, port = metered
    before = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    received = received_seconds(port)
    encoded = encoded_chunks(port)
    # 1.5 s: two 640 ms chunks of speech encoded and prefilled before the cancel
    held = Held([start(session_id="live-cancel"), *[audio(samples(0.25))] * 6])
    call = stub.GenerateLive(iter(held), metadata=[("x-request-id", "live-cancel")])
    try:
        wait_until(lambda: received_seconds(port) == pytest.approx(received + 1.5), 30,
                   "the six chunks received")
        wait_until(lambda: encoded_chunks(port) == encoded + 2, 30, "two chunks prefilled")
        assert open_streams(port) == 1
        # the encoder the utterance needs at its end is in use (not offloaded) until then
        during = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
        assert "audio" in during.modalities_in_use
        call.cancel()
        wait_until(lambda: open_streams(port) == 0, 30, "the live stream closed")
    finally:
        held.release.set()
    after = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    assert "audio" not in after.modalities_in_use
    assert after.running_requests == 0 and not after.requests
    # nothing held; the text before the speech may stay cached for a later prompt to
    # find, never the speech (tests/unit/test_scheduler.py)
    assert after.kv_bytes - after.cached_kv_bytes == before.kv_bytes - before.cached_kv_bytes
    assert [s.session_id for s in after.sessions] == [s.session_id for s in before.sessions]
    assert call.code() == grpc.StatusCode.CANCELLED


def test_metrics_count_audio_seconds_and_open_streams(stub, metered):
    _, port = metered
    received = received_seconds(port)
    reply(stub.GenerateLive(iter(utterance(start(), [samples(0.25)] * 2))))
    assert received_seconds(port) == pytest.approx(received + 0.5)
    assert open_streams(port) == 0
    rpcs = scrape(port)[("autoglm_rpcs_total", (("code", "OK"), ("method", LIVE)))]
    assert rpcs >= 1


class Speaking:
    """A client that sends `said`, waits until released (still speaking), then `rest`."""

    def __init__(self, said: list[pb.GenerateLiveRequest],
                 rest: list[pb.GenerateLiveRequest]) -> None:
        self.said, self.rest = said, rest
        self.release = threading.Event()

    def __iter__(self) -> Iterator[pb.GenerateLiveRequest]:
        yield from self.said
        if self.release.wait(60):  # never released: the stream closes before its end
            yield from self.rest


def test_speech_is_encoded_and_prefilled_while_it_is_spoken(stub, control, metered):
    _, port = metered
    before = encoded_chunks(port)
    first_tokens = scrape(port)[("autoglm_live_audio_end_to_first_token_seconds_count", MODEL)]
    # 1.5 s: two whole 640 ms chunks, then 0.22 s that waits for the end
    speaking = Speaking([start(), *[audio(samples(0.25))] * 6], [END])
    call = stub.GenerateLive(iter(speaking))
    try:
        wait_until(lambda: encoded_chunks(port) == before + 2, 30,
                   "the two whole chunks encoded before the end")
        status = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
        assert status.running_requests == 1 and status.kv_bytes > 0  # prefilled into KV
    finally:
        speaking.release.set()
    _, final = reply(call)
    assert encoded_chunks(port) == before + 3  # the last, partial chunk at the end
    assert final.usage.audio_tokens == 19  # 1.5 s at 80 ms a token, the last one partial
    assert scrape(port)[("autoglm_live_audio_end_to_first_token_seconds_count", MODEL)] == (
        first_tokens + 1)


def test_speech_then_silence_ends_the_input_when_asked(stub):
    first = start()
    first.start.end_on_silence_ms = 300
    quiet = bytes(RATE // 10 * 2)  # 100 ms of silence
    # leading silence ends nothing; speech, then 300 ms of silence does; what the client
    # goes on sending is dropped, and its own end is taken
    speaking = Speaking([first, audio(quiet), audio(quiet), audio(quiet), audio(quiet),
                         audio(samples(0.2)), audio(quiet), audio(quiet), audio(quiet)],
                        [audio(quiet), END])
    call = stub.GenerateLive(iter(speaking))
    try:
        responses = iter(call)
        first_response = next(responses)  # the reply began before the client's end
    finally:
        speaking.release.set()
    _, final = reply([first_response, *responses])
    assert final.usage.audio_seconds == pytest.approx(0.9)
    assert final.usage.audio_tokens == 12  # 0.9 s at 80 ms a token


def test_without_end_on_silence_silence_is_audio_like_any_other(stub):
    quiet = bytes(RATE // 10 * 2)
    _, final = reply(stub.GenerateLive(iter(utterance(start(), [samples(0.2), *[quiet] * 5]))))
    assert final.usage.audio_seconds == pytest.approx(0.7)


def test_after_an_end_on_silence_a_second_start_is_still_invalid(stub):
    first = start()
    first.start.end_on_silence_ms = 100
    quiet = bytes(RATE // 10 * 2)
    error = error_of(stub.GenerateLive(iter([first, audio(samples(0.2)), audio(quiet),
                                             audio(quiet), start(), END])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(error) == "start" and "follows end" in error.details()


def test_two_choices_of_one_utterance_answer_as_generate_s(stub):
    pcm = samples(1.0)
    first = start(n=2)
    live = list(stub.GenerateLive(iter(utterance(first, chunked(pcm, 100)))))
    whole = pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=pcm, sample_rate_hz=RATE,
                                                   encoding=pb.PCM_ENCODING_S16LE)))
    request = pb.GenerateRequest(messages=[user(pb.Part(text="What is said?"), whole)],
                                 sampling=GREEDY, n=2)
    generated = list(stub.Generate(request))

    def texts(responses: list[pb.GenerateResponse]) -> dict[int, str]:
        by_index: dict[int, str] = {0: "", 1: ""}
        for response in responses:
            by_index[response.index] += response.text_delta
        return by_index

    assert texts(live) == texts(generated)
    assert len(live[-1].final.choices) == 2
    assert live[-1].final.usage.prompt_tokens == generated[-1].final.usage.prompt_tokens
