"""Generate over a real gRPC channel against a real server process (tiny model)."""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from tests.conftest import png_bytes, text_request, wav_bytes
from tests.support.polling import wait_until


def collect(stub, request, **kwargs) -> tuple[str, pb.FinalMessage, list[pb.GenerateResponse]]:
    responses = list(stub.Generate(request, **kwargs))
    text = "".join(r.text_delta for r in responses)
    return text, responses[-1].final, responses


def test_stream_has_deltas_then_exactly_one_final(stub):
    text, final, responses = collect(stub, text_request("Hello", max_new_tokens=12, seed=1))
    assert len(responses) >= 3
    assert [r.HasField("final") for r in responses] == [False] * (len(responses) - 1) + [True]
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 12
    assert final.usage.prompt_tokens > 0
    assert text


def test_request_id_comes_from_metadata(stub):
    call = stub.Generate(text_request("hi", max_new_tokens=2), metadata=[("x-request-id", "rid-7")])
    responses = list(call)
    assert {r.request_id for r in responses} == {"rid-7"}
    assert ("x-request-id", "rid-7") in call.initial_metadata()


def test_same_seed_same_text_and_other_seed_differs(stub):
    first, _, _ = collect(stub, text_request("Tell me", max_new_tokens=16, seed=42))
    again, _, _ = collect(stub, text_request("Tell me", max_new_tokens=16, seed=42))
    other, _, _ = collect(stub, text_request("Tell me", max_new_tokens=16, seed=43))
    assert first == again
    assert first != other


def test_deltas_are_whole_utf8_on_chinese(stub):
    # the tiny byte-level tokenizer splits CJK characters across tokens
    _, final, responses = collect(stub, text_request("你是谁?今天天气很好", max_new_tokens=40,
                                                      seed=5, temperature=1.0))
    for response in responses:
        response.text_delta.encode("utf-8")  # proto strings are valid UTF-8 by construction
        assert not response.text_delta.endswith("\ufffd") or response.HasField("final")
    assert final.usage.completion_tokens == 40


def test_max_new_tokens_bounds_the_completion(stub):
    _, final, _ = collect(stub, text_request("count", max_new_tokens=3, seed=1))
    assert final.usage.completion_tokens == 3
    assert final.finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_sequence_cuts_the_text_before_it(stub):
    full, _, _ = collect(stub, text_request("story", max_new_tokens=30, seed=9, temperature=0))
    stop = next(full[i : i + 2] for i in range(4, len(full) - 2) if full[i : i + 2].strip())
    cut, final, _ = collect(
        stub, text_request("story", max_new_tokens=30, seed=9, temperature=0,
                           stop_sequences=[stop])
    )
    assert final.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert final.matched_stop_sequence == stop
    assert cut == full[: full.index(stop)]
    assert stop not in cut


def test_image_and_audio_count_their_tokens(stub):
    request = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(text="What is this?"),
            pb.Part(image=pb.Image(data=png_bytes(), mime_type="image/png")),
            pb.Part(audio=pb.Audio(wav=wav_bytes(1.0))),
        ])],
        sampling=pb.SamplingParams(max_new_tokens=4, seed=1),
    )
    _, final, _ = collect(stub, request)
    assert final.usage.image_tokens > 0
    assert final.usage.audio_tokens > 0
    text_only = stub.CountTokens(pb.CountTokensRequest(messages=[
        pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="What is this?")])
    ]))
    assert final.usage.prompt_tokens == (
        text_only.prompt_tokens + final.usage.image_tokens + final.usage.audio_tokens
    )
    assert [(i.original_width, i.original_height) for i in final.images] == [(96, 64)]


def test_image_content_changes_the_output(stub):
    def reply(color):
        request = pb.GenerateRequest(
            messages=[pb.Message(role=pb.ROLE_USER, parts=[
                pb.Part(image=pb.Image(data=png_bytes(color=color), mime_type="image/png")),
                pb.Part(text="Describe"),
            ])],
            sampling=pb.SamplingParams(max_new_tokens=12, temperature=0),
        )
        return collect(stub, request)[0]

    assert reply((255, 0, 0)) == reply((255, 0, 0))
    assert reply((255, 0, 0)) != reply((0, 0, 255))


def test_raw_pcm_audio_is_accepted(stub):
    import numpy as np

    pcm = (np.sin(np.arange(8000) / 5) * 10000).astype("<i2").tobytes()
    request = pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(
            data=pcm, sample_rate_hz=8000, encoding=pb.PCM_ENCODING_S16LE)))])],
        sampling=pb.SamplingParams(max_new_tokens=2),
    )
    _, final, _ = collect(stub, request)
    assert final.usage.audio_tokens > 0


def error_of(call_fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call_fn()
    return info.value


def test_corrupt_image_is_invalid_argument_naming_the_part(stub):
    request = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
        pb.Part(text="look"),
        pb.Part(image=pb.Image(data=b"\x89PNG broken", mime_type="image/png")),
    ])])
    error = error_of(lambda: list(stub.Generate(request)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].parts[1].image" in error.details()
    status = rpc_status.from_call(error)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "INVALID_MEDIA"
    assert info.metadata["field"] == "messages[0].parts[1].image"


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (pb.GenerateRequest(), "messages must not be empty"),
        (pb.GenerateRequest(messages=[pb.Message(parts=[pb.Part(text="x")])]), "role"),
        (pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part()])]),
         "parts[0] is empty"),
        (text_request("x", temperature=5.0), "temperature"),
        (text_request("x", top_p=0.0), "top_p"),
        (text_request("x", max_new_tokens=0), "max_new_tokens"),
        (pb.GenerateRequest(messages=text_request("x").messages, session_id="bad id!"),
         "session_id"),
        (pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(image=pb.Image(data=png_bytes(), mime_type="image/gif"))])]), "MIME"),
        (pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(audio=pb.Audio(wav=b"RIFF0000WAVEjunk"))])]), "parts[0].audio.wav"),
    ],
)
def test_invalid_requests_get_invalid_argument(stub, request_, fragment):
    error = error_of(lambda: list(stub.Generate(request_)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in error.details()


def test_oversized_message_is_rejected_and_server_keeps_serving(stub):
    huge = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
        pb.Part(image=pb.Image(data=b"\0" * (33 * 1024 * 1024), mime_type="image/png"))])])
    error = error_of(lambda: list(stub.Generate(huge)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, final, _ = collect(stub, text_request("still there?", max_new_tokens=2))
    assert final.usage.completion_tokens == 2


def test_deadline_exceeded_ends_the_call(stub):
    request = text_request("long", max_new_tokens=20000, min_new_tokens=20000)
    error = error_of(lambda: list(stub.Generate(request, timeout=0.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cancel_mid_stream_stops_generation(stub, control, inference_server):
    call = stub.Generate(text_request("go on", max_new_tokens=20000, min_new_tokens=20000),
                         metadata=[("x-request-id", "to-cancel")])
    first = next(call)
    assert first.text_delta or first.request_id
    running = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    assert [r.request_id for r in running.requests] == ["to-cancel"]
    assert running.kv_bytes > 0
    call.cancel()
    status = wait_until(lambda: none_running(control), 30, "the cancelled request gone")
    assert status.running_requests == 0
    # what KV is left belongs to sessions and cached blocks of earlier, finished requests
    assert status.kv_bytes == status.cached_kv_bytes + sum(s.bytes for s in status.sessions)
    assert not [s for s in status.sessions if "to-cancel" in s.session_id]
    finished = inference_server.wait_for_log("generation_finished", "to-cancel")
    assert finished["finish_reason"] == "cancelled"
    assert finished["completion_tokens"] < 20000


def none_running(control) -> cpb.MemoryStatus | None:
    """The memory account once no request holds KV, else None."""
    status = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    return None if status.requests else status


def test_concurrent_streams_all_complete(stub):
    results: list[pb.FinalMessage] = []

    def run(seed: int) -> None:
        results.append(collect(stub, text_request("hi", max_new_tokens=8, seed=seed))[1])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.usage.completion_tokens for r in results] == [8] * 6


def test_model_info_says_which_weights_are_untrained(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert {m.name for m in info.modules} == {"decoder", "vision", "audio"}
    assert all(not m.trained for m in info.modules)
    assert set(info.modalities) == {"text", "image", "audio"}
    assert info.context_length == 2048
    assert info.default_sampling.max_new_tokens == 256
    assert info.default_sampling.min_new_tokens == 32
    assert info.default_sampling.repetition_penalty == pytest.approx(1.2)


def test_unknown_session_is_not_found(stub):
    error = error_of(lambda: stub.EndSession(pb.EndSessionRequest(session_id="nope"),
                                             metadata=[("x-request-id", "rid-404")]))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert ("x-request-id", "rid-404") in error.trailing_metadata()


def test_every_call_returns_its_request_id(stub):
    _, call = stub.GetModelInfo.with_call(pb.GetModelInfoRequest(),
                                          metadata=[("x-request-id", "rid-info")])
    assert ("x-request-id", "rid-info") in call.trailing_metadata()


def audio_request(audio: pb.Audio) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="listen"),
                                                        pb.Part(audio=audio)])],
        sampling=pb.SamplingParams(max_new_tokens=2),
    )


@pytest.mark.parametrize("audio", [
    pb.Audio(wav=wav_bytes(0.010)),
    pb.Audio(wav=wav_bytes(0.020, rate=8000)),
    pb.Audio(pcm=pb.PcmAudio(data=b"\0\0" * 320, sample_rate_hz=16000,
                             encoding=pb.PCM_ENCODING_S16LE)),
], ids=["wav-10ms", "wav-20ms-8k", "pcm-20ms"])
def test_a_clip_shorter_than_a_token_is_one_audio_token(stub, audio):
    # the chunked encoder pads each chunk's window: any clip of a sample or more encodes
    _, final, _ = collect(stub, audio_request(audio))
    assert final.usage.audio_tokens == 1


@pytest.mark.parametrize("value", [3e38, 1.5, float("nan")])
def test_float_pcm_outside_unit_range_is_invalid_argument(stub, value):
    import numpy as np

    samples = np.zeros(1600, "<f4")
    samples[100] = value
    audio = pb.Audio(pcm=pb.PcmAudio(data=samples.tobytes(), sample_rate_hz=16000,
                                     encoding=pb.PCM_ENCODING_F32LE))
    error = error_of(lambda: list(stub.Generate(audio_request(audio))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith("messages[0].parts[1].audio.pcm")


def test_long_mime_type_is_quoted_briefly(stub):
    request = pb.GenerateRequest(messages=[pb.Message(role=pb.ROLE_USER, parts=[
        pb.Part(image=pb.Image(data=png_bytes(), mime_type="image/" + "x" * 5000))])])
    error = error_of(lambda: list(stub.Generate(request)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unsupported image MIME type" in error.details()
    assert "(5006 characters)" in error.details()
    assert len(error.details()) < 400


def test_long_session_id_is_invalid_argument_on_end_session(stub):
    error = error_of(lambda: stub.EndSession(pb.EndSessionRequest(session_id="s" * 10_240)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "session_id" in error.details()
    assert len(error.details()) < 400
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(error).details[0].Unpack(info)
    assert info.metadata["field"] == "session_id"


@pytest.mark.parametrize("session_id", ["", "bad id!", "s" * 129])
def test_end_session_validates_ids_like_generate(stub, session_id):
    end = error_of(lambda: stub.EndSession(pb.EndSessionRequest(session_id=session_id)))
    assert end.code() == grpc.StatusCode.INVALID_ARGUMENT
    if session_id:
        request = pb.GenerateRequest(messages=text_request("x").messages, session_id=session_id)
        generate = error_of(lambda: list(stub.Generate(request)))
        assert generate.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert generate.details() == end.details()
