"""No request can stop the service: one table of hostile inputs against a real server.

Each row names a class of bad input, the status the service must answer with, and how to
send it. Every call carries a deadline (a call that hits it where another status is
expected is a hang, and fails), no row may end UNKNOWN or INTERNAL, and after every row
the server is still SERVING, answers a small valid Generate and holds no running KV.

Run with `-s` to see the table of class -> status; with BENCH_OUT set it is also written
to $BENCH_OUT/hostile_inputs.json.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, png_bytes, wav_bytes
from tests.inference_svc.liveness import assert_still_serving
from tests.inference_svc.raw_http2 import call_unary_stream

Code = grpc.StatusCode
CALL_TIMEOUT = 60.0  # the hang bound of one call; the tiny model answers in well under 1 s
GENERATE = "/autoglm.inference.v1.InferenceService/Generate"
CONTEXT_LENGTH = 2048  # the tiny bundle's max_position_embeddings
NEVER = {Code.UNKNOWN, Code.INTERNAL}


@pytest.fixture(scope="module")
def server(own_server: ServerProcess) -> ServerProcess:
    """A server of this module's own, so hostile traffic disturbs no other test."""
    return own_server


# ---- request builders --------------------------------------------------------------------


def text(value: str) -> pb.Part:
    return pb.Part(text=value)


def image(data: bytes, mime_type: str = "") -> pb.Part:
    return pb.Part(image=pb.Image(data=data, mime_type=mime_type))


def wav(data: bytes) -> pb.Part:
    return pb.Part(audio=pb.Audio(wav=data))


def pcm(data: bytes, rate: int = 16000, encoding: int = pb.PCM_ENCODING_S16LE) -> pb.Part:
    return pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=data, sample_rate_hz=rate,
                                                  encoding=encoding)))


def request(*parts: pb.Part, role: int = pb.ROLE_USER, session_id: str = "",
            **sampling) -> pb.GenerateRequest:
    sampling.setdefault("max_new_tokens", 4)
    return pb.GenerateRequest(
        messages=[pb.Message(role=role, parts=list(parts or [text("hello")]))],
        sampling=pb.SamplingParams(**sampling), session_id=session_id,
    )


def s16_silence(seconds: float, rate: int = 16000) -> bytes:
    return b"\x00\x00" * int(seconds * rate)


def f32_samples(*values: float, repeat: int = 1600) -> bytes:
    return struct.pack(f"<{len(values)}f", *values) * repeat


def png_with_short_idat() -> bytes:
    """A valid PNG whose IDAT chunk length is 8 short: Pillow raises SyntaxError on load."""
    data = png_bytes((32, 32))
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    return data[:at - 4] + (length - 8).to_bytes(4, "big") + data[at:]


def huge_png(width: int, height: int) -> bytes:
    """A flat image of many pixels; one colour, so it compresses to a few hundred KB."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 128).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


# ---- calls -------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: Code
    message: str = ""
    detail: str = ""  # what an OK call returned, for the table


def generate(channel: grpc.Channel, req: pb.GenerateRequest, *, timeout: float = CALL_TIMEOUT,
             metadata=()) -> Outcome:
    stub = pb_grpc.InferenceServiceStub(channel)
    responses = list(stub.Generate(req, timeout=timeout, metadata=metadata or None))
    assert responses, "the stream ended without a final message"
    assert responses[-1].HasField("final"), "the stream's last message is not final"
    final = responses[-1].final
    reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_")
    detail = f"{final.usage.completion_tokens} tokens, {reason}"
    if final.images:
        info = final.images[0]
        detail = (f"image {info.original_width}x{info.original_height} encoded at "
                  f"{info.width}x{info.height}; {detail}")
    return Outcome(Code.OK, detail=detail)


def raw_generate(channel: grpc.Channel, data: bytes) -> Outcome:
    replies = list(channel.unary_stream(GENERATE)(data, timeout=CALL_TIMEOUT))
    final = pb.GenerateResponse.FromString(replies[-1])
    assert final.HasField("final")
    return Outcome(Code.OK)


def count_tokens(channel: grpc.Channel, *parts: pb.Part) -> Outcome:
    stub = pb_grpc.InferenceServiceStub(channel)
    reply = stub.CountTokens(pb.CountTokensRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=list(parts))]), timeout=CALL_TIMEOUT)
    return Outcome(Code.OK, detail=f"prompt_tokens={reply.prompt_tokens}")


def end_session(channel: grpc.Channel, session_id: str) -> Outcome:
    stub = pb_grpc.InferenceServiceStub(channel)
    reply = stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=CALL_TIMEOUT)
    return Outcome(Code.OK, detail=f"freed_bytes={reply.freed_bytes}")


def cancel_after_first_delta(channel: grpc.Channel) -> Outcome:
    stub = pb_grpc.InferenceServiceStub(channel)
    call = stub.Generate(request(text("count to a thousand"), max_new_tokens=1500,
                                 min_new_tokens=1500), timeout=CALL_TIMEOUT)
    first = next(call)
    assert not first.HasField("final"), "the generation ended before it could be cancelled"
    call.cancel()
    for _ in call:
        pass
    return Outcome(Code.OK)


def tight_deadline(channel: grpc.Channel) -> Outcome:
    return generate(channel, request(text("tell a long story"), max_new_tokens=2000,
                                     min_new_tokens=2000), timeout=0.05)


def raw_metadata_generate(server: ServerProcess, request_id: bytes) -> Outcome:
    """A valid Generate whose x-request-id header carries bytes no gRPC client would send."""
    reply = call_unary_stream("127.0.0.1", server.port, GENERATE, request().SerializeToString(),
                              [(b"x-request-id", request_id)], timeout=CALL_TIMEOUT)
    if reply.reset_code is not None:
        return Outcome(Code.UNAVAILABLE, f"stream reset with HTTP/2 error {reply.reset_code}")
    status = reply.grpc_status
    code = next((c for c in Code if c.value[0] == status), Code.UNKNOWN)
    if code != Code.OK:
        return Outcome(code, reply.grpc_message)
    final = pb.GenerateResponse.FromString(reply.messages[-1])
    assert final.HasField("final")
    echoed = reply.headers.get("x-request-id")
    assert echoed != request_id, "the service echoed a request id that is not printable ASCII"
    return Outcome(Code.OK, detail=f"served; x-request-id replaced by {final.request_id!r}")


def invalid_utf8_request() -> bytes:
    data = request(text("hello there")).SerializeToString()
    return data.replace(b"hello there", b"hello\xff\xfehere")


def long_prompt() -> pb.GenerateRequest:
    return request(text(" ".join(["word"] * (CONTEXT_LENGTH * 2))))


@dataclass(frozen=True)
class Case:
    name: str
    expected: Code | tuple[Code, ...]
    send: Callable[[grpc.Channel, ServerProcess], Outcome]

    @property
    def allowed(self) -> tuple[Code, ...]:
        return self.expected if isinstance(self.expected, tuple) else (self.expected,)


def gen(name: str, expected: Code | tuple[Code, ...], req: pb.GenerateRequest, **kwargs) -> Case:
    return Case(name, expected, lambda channel, _: generate(channel, req, **kwargs))


WAV = wav_bytes(0.5)
PNG = png_bytes((64, 64))
INVALID = Code.INVALID_ARGUMENT

CASES = [
    gen("empty messages", INVALID, pb.GenerateRequest(
        sampling=pb.SamplingParams(max_new_tokens=4))),
    gen("unknown role (99)", INVALID, request(role=99)),
    gen("empty parts", INVALID, pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER)], sampling=pb.SamplingParams(max_new_tokens=4))),
    gen("part with no content", INVALID, request(pb.Part())),
    gen("max_new_tokens 0", INVALID, request(max_new_tokens=0)),
    gen("max_new_tokens 10^6", INVALID, request(max_new_tokens=10**6)),
    gen("temperature -1", INVALID, request(temperature=-1.0)),
    gen("temperature NaN", INVALID, request(temperature=math.nan)),
    gen("temperature 1e-38 (greedy)", Code.OK, request(temperature=1e-38)),
    gen("temperature 3.0", INVALID, request(temperature=3.0)),
    gen("top_p 0", INVALID, request(top_p=0.0)),
    gen("top_p 2", INVALID, request(top_p=2.0)),
    gen("top_p NaN", INVALID, request(top_p=math.nan)),
    gen("repetition_penalty 0", INVALID, request(repetition_penalty=0.0)),
    gen("repetition_penalty 1e-38", INVALID, request(repetition_penalty=1e-38)),
    gen("repetition_penalty 100", INVALID, request(repetition_penalty=100.0)),
    gen("frequency_penalty 5", INVALID, request(frequency_penalty=5.0)),
    gen("presence_penalty -inf", INVALID, request(presence_penalty=-math.inf)),
    gen("17 stop sequences", INVALID, request(stop_sequences=[f"s{i}" for i in range(17)])),
    gen("300-char stop sequence", INVALID, request(stop_sequences=["x" * 300])),
    gen("empty stop sequence", INVALID, request(stop_sequences=[""])),
    gen("corrupt image bytes", INVALID, request(image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64))),
    gen("truncated PNG", INVALID, request(image(PNG[: len(PNG) // 2]))),
    gen("PNG with a short IDAT length", INVALID, request(image(png_with_short_idat()))),
    Case("CountTokens PNG, short IDAT", INVALID,
         lambda c, _: count_tokens(c, image(png_with_short_idat()))),
    gen("empty image", INVALID, request(image(b""))),
    gen("5,000-char image mime_type", INVALID, request(image(PNG, "image/" + "x" * 4994))),
    gen("mime_type jpeg for a PNG", INVALID, request(image(PNG, "image/jpeg"))),
    gen("8000x8000 PNG (max_pixels)", Code.OK, request(image(huge_png(8000, 8000)))),
    gen("8001x8000 PNG (over 64M px)", INVALID, request(image(huge_png(8001, 8000)))),
    gen("truncated WAV header", INVALID, request(wav(WAV[:30]))),
    gen("truncated WAV data", Code.OK, request(wav(WAV[: len(WAV) // 2]))),
    gen("WAV not RIFF", INVALID, request(wav(b"RIFX" + WAV[4:]))),
    # the chunked audio encoder pads each chunk's window: a clip of a sample or more is fine
    gen("10 ms audio", Code.OK, request(pcm(s16_silence(0.010)))),
    gen("1 sample of audio", Code.OK, request(pcm(b"\x00\x00"))),
    gen("f32le samples 3e38", INVALID,
        request(pcm(f32_samples(3e38, 0.0), encoding=pb.PCM_ENCODING_F32LE))),
    gen("f32le samples NaN", INVALID,
        request(pcm(f32_samples(math.nan, 0.0), encoding=pb.PCM_ENCODING_F32LE))),
    gen("PCM sample_rate 0", INVALID, request(pcm(s16_silence(0.5), rate=0))),
    gen("PCM sample_rate 10^9", INVALID, request(pcm(s16_silence(0.5), rate=10**9))),
    gen("PCM odd byte count", INVALID, request(pcm(s16_silence(0.5) + b"\x00"))),
    gen("PCM encoding unset", INVALID,
        request(pcm(s16_silence(0.5), encoding=pb.PCM_ENCODING_UNSPECIFIED))),
    gen("PCM 200 s (over the limit)", INVALID, request(pcm(s16_silence(200.0, rate=1000),
                                                           rate=1000))),
    gen("session_id 10 KB", INVALID, request(session_id="s" * 10_240)),
    gen("session_id with control chars", INVALID, request(session_id="abc\x00\x1b[2J\n")),
    # 10 KB is past grpc-core's 8 KB soft metadata limit and under its 16 KB hard one: the
    # transport refuses such calls with a probability that grows with the size.
    gen("x-request-id 10 KB", (Code.OK, Code.RESOURCE_EXHAUSTED), request(),
        metadata=(("x-request-id", "r" * 10_240),)),
    gen("x-request-id 20 KB", Code.RESOURCE_EXHAUSTED, request(),
        metadata=(("x-request-id", "r" * 20_480),)),
    # grpc clients refuse such metadata locally (INTERNAL "Invalid metadata"): sent raw.
    Case("x-request-id non-ASCII (raw h2)", Code.OK,
         lambda _, s: raw_metadata_generate(s, "zażółć-グレー\x7f".encode())),
    Case("x-request-id control chars (raw h2)", Code.OK,
         lambda _, s: raw_metadata_generate(s, b"abc\x01\x1b[2J")),
    gen("prompt longer than context", INVALID, long_prompt()),
    Case("EndSession 10 KB id", INVALID, lambda c, _: end_session(c, "s" * 10_240)),
    Case("EndSession unknown id", Code.NOT_FOUND, lambda c, _: end_session(c, "no-such-session")),
    Case("EndSession empty id", INVALID, lambda c, _: end_session(c, "")),
    Case("CountTokens corrupt image", INVALID,
         lambda c, _: count_tokens(c, image(b"GIF89a" + b"\xff" * 40))),
    Case("CountTokens corrupt audio", INVALID, lambda c, _: count_tokens(c, wav(b"RIFF\x00\x01"))),
    Case("raw garbage bytes", INVALID, lambda c, _: raw_generate(c, b"\xff" * 32)),
    Case("raw truncated protobuf", INVALID,
         lambda c, _: raw_generate(c, request(image(PNG)).SerializeToString()[:-7])),
    Case("raw invalid UTF-8 text", INVALID, lambda c, _: raw_generate(c, invalid_utf8_request())),
    Case("raw empty request", INVALID, lambda c, _: raw_generate(c, b"")),
    Case("cancel after first delta", Code.CANCELLED, lambda c, _: cancel_after_first_delta(c)),
    Case("0.05 s deadline, long generation", Code.DEADLINE_EXCEEDED,
         lambda c, _: tight_deadline(c)),
]


# ---- the after-each checks ---------------------------------------------------------------


def error_log_lines(server: ServerProcess) -> list[dict]:
    return [line for line in server.log_lines()
            if line.get("level") in ("error", "critical", "exception")
            or "traceback" in json.dumps(line).lower()]


# ---- the table ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> Iterator[list[dict]]:
    rows: list[dict] = []
    yield rows
    width = max(len(row["class"]) for row in rows) if rows else 10
    lines = [f"{'class'.ljust(width)}  {'status'.ljust(18)}  message / result",
             f"{'-' * width}  {'-' * 18}  {'-' * 60}"]
    lines += [f"{row['class'].ljust(width)}  {row['status'].ljust(18)}  {row['message'][:60]}"
              for row in rows]
    print("\n\nhostile inputs: class -> status\n" + "\n".join(lines))
    if folder := os.environ.get("BENCH_OUT"):
        path = Path(folder) / "hostile_inputs.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"benchmark": "hostile_inputs", "rows": rows}, indent=2))
        print(f"table written to {path}")


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_gets_a_precise_status_and_the_server_lives(server, channel, table, case):
    errors_before = len(error_log_lines(server))
    try:
        outcome = case.send(channel, server)
    except grpc.RpcError as error:
        outcome = Outcome(error.code(), error.details() or "")
    shown = outcome.message or outcome.detail
    table.append({"class": case.name, "status": outcome.code.name, "message": shown,
                  "expected": "|".join(code.name for code in case.allowed)})
    print(f"\n{case.name} -> {outcome.code.name}: {shown[:60]}")

    assert outcome.code not in NEVER, f"{case.name}: {outcome.code.name} {outcome.message}"
    assert outcome.code in case.allowed, f"{case.name}: {outcome.code.name} {outcome.message}"
    if outcome.code == INVALID:
        assert outcome.message, "an INVALID_ARGUMENT must say what is wrong"
        assert len(outcome.message.encode()) <= 1024, "the message echoes too much input"
    assert_still_serving(server, channel)
    assert error_log_lines(server)[errors_before:] == [], "the server logged an error"
