"""Fuzzing Generate against a real server: no request ends UNKNOWN, INTERNAL or in a hang.

Two kinds of example, each sent to a module-scoped server on the tiny bundle:
  - structure-aware: GenerateRequests drawn from hypothesis strategies (unknown roles, random
    unicode, valid and byte-mutated PNG/JPEG/WAV, PCM of any rate and encoding, extreme
    sampling floats and ints, odd session ids, stop sequences);
  - byte-mutated: a valid serialized request with an image and audio, its bytes flipped,
    cut, inserted or deleted, sent raw.
Every call has a short deadline and must end within it plus a margin, with a status in
ALLOWED. Afterwards a valid request succeeds, health is SERVING and the control account
holds no running request's KV.

AUTOGLM_FUZZ_EXAMPLES sets the examples of the default run (200, split between the two
kinds); the `bench` variant runs 5,000. Outcome counts print with -s and go to
$BENCH_OUT/fuzz_<name>.json when BENCH_OUT is set. Runs are derandomized and keep no
example database, so they write nothing into the repository.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import ServerProcess, png_bytes, wav_bytes
from tests.inference_svc.liveness import assert_still_serving, memory_status

Code = grpc.StatusCode
GENERATE = "/autoglm.inference.v1.InferenceService/Generate"
CALL_TIMEOUT = 10.0  # each example's deadline; small max_new_tokens keeps calls far below it
MARGIN = 10.0  # a call not over after its deadline plus this is a hang
ALLOWED = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED,
           Code.DEADLINE_EXCEEDED, Code.CANCELLED}
EXAMPLES = int(os.environ.get("AUTOGLM_FUZZ_EXAMPLES", 200))
BENCH_EXAMPLES = 5000
SESSIONS = ["fuzz-a", "fuzz-b", "fuzz-c"]


def examples_of(total: int, share: float) -> int:
    return max(1, round(total * share))


@pytest.fixture(scope="module")
def server(own_server: ServerProcess) -> ServerProcess:
    """A server of this module's own, so fuzz traffic disturbs no other test."""
    return own_server


# ---- media seeds -------------------------------------------------------------------------


def jpeg_bytes(size: tuple[int, int] = (40, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (20, 120, 220)).save(buffer, "JPEG", quality=70)
    return buffer.getvalue()


IMAGE_SEEDS = [png_bytes((32, 32)), png_bytes((70, 20), (0, 200, 0)), jpeg_bytes()]
WAV_SEEDS = [wav_bytes(0.1), wav_bytes(0.05, rate=8000), wav_bytes(0.2, rate=44100)]
MIME_TYPES = ["", "image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif",
              "text/plain", "IMAGE/PNG"]


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few byte flips, then maybe a truncation or an insertion."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 4))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if cut is not None:
        del data[cut:]
    insert_at = draw(st.one_of(st.none(), st.integers(0, len(data))))
    if insert_at is not None:
        data[insert_at:insert_at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


def blob(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A seed as it is (half the time), a mutated seed, or random bytes."""
    seed = st.integers(0, len(seeds) - 1).map(seeds.__getitem__)  # keeps reprs short
    return st.one_of(seed, seed, seed.flatmap(mutated), st.binary(max_size=64))


# ---- request strategies ------------------------------------------------------------------

FLOATS = st.floats(width=32)  # every float32: NaN, infinities, subnormals, huge
ODD_FLOATS = st.sampled_from([0.0, -0.0, 1e-38, -1e-38, 1.0, 2.0, 3e38, -3e38,
                              float("nan"), float("inf"), float("-inf")])
UINT32 = st.integers(0, 2**32 - 1)


def mostly(usual: st.SearchStrategy, odd: st.SearchStrategy, weight: int = 3):
    """`usual` about `weight` times as often as `odd`, so most examples get past validation."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda u: usual if u else odd)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Unset (the server's default) most of the time."""
    return mostly(st.none(), strategy)


def floats_around(low: float, high: float) -> st.SearchStrategy[float]:
    """Sensible values between `low` and `high`, sometimes any float32 at all."""
    return mostly(st.floats(low, high), st.one_of(FLOATS, ODD_FLOATS), weight=2)


images = st.builds(pb.Image, data=blob(IMAGE_SEEDS),
                   mime_type=st.one_of(st.sampled_from(MIME_TYPES), st.text(max_size=40)))
pcm = st.builds(
    pb.PcmAudio,
    data=st.one_of(st.binary(max_size=2000),
                   st.integers(0, 4000).map(lambda n: b"\x10\x00" * n)),
    sample_rate_hz=st.one_of(st.sampled_from([8000, 16000, 44100, 48000]), UINT32),
    encoding=st.integers(0, 4),
    channels=st.one_of(st.integers(0, 3), UINT32),
)
audios = st.one_of(st.builds(pb.Audio, wav=blob(WAV_SEEDS)), st.builds(pb.Audio, pcm=pcm))
# Parts that decode (with random text and sensible media), and parts that may not.
good_parts = st.one_of(
    st.builds(pb.Part, text=st.text(max_size=200)),
    st.builds(pb.Part, text=st.text(max_size=200)),
    st.builds(pb.Part, image=st.builds(pb.Image, data=st.sampled_from(IMAGE_SEEDS[:1]))),
    st.builds(pb.Part, audio=st.builds(pb.Audio, wav=st.sampled_from(WAV_SEEDS[:1]))),
    st.builds(pb.Part, audio=st.builds(pb.Audio, pcm=st.builds(
        pb.PcmAudio, data=st.integers(400, 4000).map(lambda n: b"\x10\x00" * n),
        sample_rate_hz=st.sampled_from([8000, 16000, 22050, 48000]),
        encoding=st.just(pb.PCM_ENCODING_S16LE)))),
)
odd_parts = st.one_of(st.builds(pb.Part, image=images), st.builds(pb.Part, audio=audios),
                      st.just(pb.Part()))
parts = mostly(good_parts, odd_parts, weight=4)
roles = mostly(st.sampled_from([pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_USER, pb.ROLE_ASSISTANT]),
              st.integers(-(2**31), 2**31 - 1), weight=8)
messages = st.builds(pb.Message, role=roles,
                     parts=mostly(st.lists(parts, min_size=1, max_size=3), st.just([]), weight=8))


@st.composite
def sampling_params(draw) -> pb.SamplingParams:
    fields = {
        # Capped small, or past every limit, so no example generates for long.
        "max_new_tokens": maybe(mostly(st.integers(0, 6), st.sampled_from([10**6, 2**32 - 1]))),
        "min_new_tokens": maybe(st.one_of(st.integers(0, 6), UINT32)),
        "temperature": maybe(floats_around(0.0, 2.0)),
        "top_p": maybe(floats_around(0.01, 1.0)),
        "top_k": maybe(st.one_of(st.integers(0, 50), UINT32)),
        "repetition_penalty": maybe(floats_around(0.5, 2.0)),
        "frequency_penalty": maybe(floats_around(-2.0, 2.0)),
        "presence_penalty": maybe(floats_around(-2.0, 2.0)),
        "seed": maybe(st.integers(0, 2**64 - 1)),
    }
    values = {name: draw(strategy) for name, strategy in fields.items()}
    values["max_new_tokens"] = 4 if values["max_new_tokens"] is None else values["max_new_tokens"]
    stops = draw(mostly(st.lists(st.text(min_size=1, max_size=8), max_size=3),
                        st.lists(st.one_of(st.text(max_size=8), st.text(min_size=250,
                                                                        max_size=300)),
                                 max_size=18)))
    return pb.SamplingParams(**{k: v for k, v in values.items() if v is not None},
                             stop_sequences=stops)


session_ids = mostly(
    st.one_of(st.just(""), st.sampled_from(SESSIONS)),
    st.one_of(st.from_regex(r"[A-Za-z0-9._:-]{1,130}", fullmatch=True), st.text(max_size=60)),
)
generate_requests = st.builds(
    pb.GenerateRequest,
    messages=mostly(st.lists(messages, min_size=1, max_size=3), st.just([]), weight=10),
    sampling=sampling_params(),
    session_id=session_ids,
    enable_thinking=st.booleans(),
    return_reasoning=st.booleans(),
    priority=mostly(st.just(0), st.integers(-(2**31), 2**31 - 1)),
)


def base_request() -> bytes:
    """A valid request with text, an image and audio: the seed of the byte-level fuzzer."""
    return pb.GenerateRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, parts=[pb.Part(text="be brief")]),
            pb.Message(role=pb.ROLE_USER, parts=[
                pb.Part(text="what is in the picture and the clip?"),
                pb.Part(image=pb.Image(data=IMAGE_SEEDS[0], mime_type="image/png")),
                pb.Part(audio=pb.Audio(wav=WAV_SEEDS[0])),
                pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(data=b"\x00\x01" * 800,
                                                       sample_rate_hz=16000,
                                                       encoding=pb.PCM_ENCODING_S16LE))),
            ]),
        ],
        sampling=pb.SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9,
                                   stop_sequences=["\n\n"]),
        session_id="fuzz-raw",
    ).SerializeToString()


BASE = base_request()


@st.composite
def mutated_requests(draw) -> bytes:
    data = bytearray(BASE)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "flip", "flip", "set", "insert", "delete",
                                   "truncate"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A]))
        elif op == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[position:position + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[position:]
    return bytes(data)


# ---- sending and judging -----------------------------------------------------------------


class Tally:
    """Outcomes per status, with the most common message starts per status."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()

    def add(self, code: Code, message: str) -> None:
        self.codes[code.name] += 1
        if code != Code.OK:
            self.messages[f"{code.name}: {message[:60]}"] += 1

    def report(self, seconds: float) -> None:
        total = sum(self.codes.values())
        lines = [f"\nfuzz {self.name}: {total} examples in {seconds:.1f} s"]
        lines += [f"  {code:<20} {count:>6}" for code, count in self.codes.most_common()]
        lines.append("  most common messages:")
        lines += [f"    {count:>5}  {text}" for text, count in self.messages.most_common(12)]
        print("\n".join(lines))
        if folder := os.environ.get("BENCH_OUT"):
            path = Path(folder) / f"fuzz_{self.name}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "benchmark": f"fuzz_{self.name}", "examples": total, "seconds": seconds,
                "codes": dict(self.codes), "messages": dict(self.messages.most_common(50)),
            }, indent=2))


def judged(tally: Tally, send: Callable[[float], list[bytes]], example: object) -> None:
    """Run one call; assert it ends in time with an allowed status; count the status."""
    shown = repr(example)[:2000]
    start = time.monotonic()
    try:
        replies = send(CALL_TIMEOUT)
        code, message = Code.OK, ""
        assert replies, f"an OK stream without messages for {shown}"
        final = pb.GenerateResponse.FromString(replies[-1])
        assert final.HasField("final"), f"an OK stream whose last message is not final: {shown}"
        assert not any(pb.GenerateResponse.FromString(r).HasField("final") for r in replies[:-1])
    except grpc.RpcError as error:
        code, message = error.code(), error.details() or ""
    elapsed = time.monotonic() - start
    tally.add(code, message)
    assert elapsed < CALL_TIMEOUT + MARGIN, f"call took {elapsed:.1f}s: {shown}"
    assert code in ALLOWED, f"{code.name} {message!r} for {shown}"


def end_fuzz_sessions(channel: grpc.Channel) -> None:
    stub = pb_grpc.InferenceServiceStub(channel)
    for session_id in [*SESSIONS, "fuzz-raw"]:
        try:
            stub.EndSession(pb.EndSessionRequest(session_id=session_id), timeout=10)
        except grpc.RpcError as error:
            assert error.code() == Code.NOT_FOUND, error


def assert_recovered(server: ServerProcess, channel: grpc.Channel) -> None:
    assert_still_serving(server, channel)
    end_fuzz_sessions(channel)
    status = memory_status(server)
    assert not {s.session_id for s in status.sessions} & {*SESSIONS, "fuzz-raw"}


FUZZ_SETTINGS = {
    "deadline": None, "derandomize": True, "database": None, "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.large_base_example],
}


def fuzz_structured(server: ServerProcess, channel: grpc.Channel, examples: int) -> None:
    tally = Tally(f"structured_{examples}")
    call = pb_grpc.InferenceServiceStub(channel).Generate
    started = time.monotonic()

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(request=generate_requests)
    def example(request: pb.GenerateRequest) -> None:
        def send(timeout: float) -> list[bytes]:
            return [r.SerializeToString() for r in call(request, timeout=timeout)]

        judged(tally, send, request)
        assert server.process.poll() is None, f"the server exited after {request!r}"

    try:
        example()
    finally:
        tally.report(time.monotonic() - started)
    assert_recovered(server, channel)


def fuzz_bytes(server: ServerProcess, channel: grpc.Channel, examples: int) -> None:
    tally = Tally(f"bytes_{examples}")
    call = channel.unary_stream(GENERATE)  # identity serializers: the bytes go out as they are
    started = time.monotonic()

    @settings(max_examples=examples, **FUZZ_SETTINGS)
    @given(data=mutated_requests())
    def example(data: bytes) -> None:
        judged(tally, lambda timeout: list(call(data, timeout=timeout)), data)
        assert server.process.poll() is None, f"the server exited after {data!r}"

    try:
        example()
    finally:
        tally.report(time.monotonic() - started)
    assert_recovered(server, channel)


def test_structured_requests_get_precise_statuses(server, channel):
    fuzz_structured(server, channel, examples_of(EXAMPLES, 0.6))


def test_byte_mutated_requests_get_precise_statuses(server, channel):
    fuzz_bytes(server, channel, examples_of(EXAMPLES, 0.4))


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_fuzz_bench_structured(server, channel):
    """3,000 structured examples (3/5 of the bench run's 5,000)."""
    fuzz_structured(server, channel, examples_of(BENCH_EXAMPLES, 0.6))


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_fuzz_bench_bytes(server, channel):
    """2,000 byte-mutated examples (2/5 of the bench run's 5,000)."""
    fuzz_bytes(server, channel, examples_of(BENCH_EXAMPLES, 0.4))


def test_base_request_is_valid(server, channel):
    """The byte fuzzer's seed itself succeeds, so its mutations start from a valid request."""
    replies = list(channel.unary_stream(GENERATE)(BASE, timeout=CALL_TIMEOUT))
    final = pb.GenerateResponse.FromString(replies[-1]).final
    assert final.usage.image_tokens > 0 and final.usage.audio_tokens > 0
    end_fuzz_sessions(channel)


def test_seed_media_are_valid():
    """Unmutated seeds decode, so the strategies cover the valid path too."""
    for data in IMAGE_SEEDS:
        Image.open(io.BytesIO(data)).load()
    for data in WAV_SEEDS:
        assert data[:4] == b"RIFF" and struct.unpack("<I", data[4:8])[0] == len(data) - 8
