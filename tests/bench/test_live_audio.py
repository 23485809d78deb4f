"""Live audio: speech streamed in real time is encoded and prefilled while it is spoken.

Time to first token after a 30 s utterance, streamed in real time in 100 ms chunks
(timed from the end marker), against the same audio sent whole through Generate (timed
from the send), rounds alternating; the replies (greedy) are compared, and the streamed
and whole embeddings of the clip (the embedded default's audio encoder, in-process).
Then 8 live streams at once in real time: the encode time of each 640 ms chunk (the
service's histogram) and each stream's time from its end to its first token, which
stays small only if no stream fell behind.

    .venv/bin/python -m pytest tests/bench/test_live_audio.py -m bench -s
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.bench.harness import median, report
from tests.conftest import start_server
from tests.inference_svc.test_metrics import free_port, scrape

pytestmark = [pytest.mark.bench, pytest.mark.timeout(1800)]
RATE = 16_000
CHUNK_MS = 100
GREEDY = pb.SamplingParams(max_new_tokens=8, min_new_tokens=8, temperature=0)
MODEL = (("model_name", "autoglm-phone-9b"),)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voice-like: a wandering pitch with harmonics, syllable-rate loudness, some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + seed)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voice = sum(np.sin(k * phase) / k for k in range(1, 6))
    loudness = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    wave = 0.2 * voice * loudness + 0.01 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def s16(wave: np.ndarray) -> bytes:
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def conversation() -> list[pb.Message]:
    return [pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Answer what is said.")])]


def live_messages(pcm: bytes, marks: dict[str, float], *, paced: bool
                  ) -> Iterator[pb.GenerateLiveRequest]:
    request = pb.GenerateRequest(messages=conversation(), sampling=GREEDY)
    yield pb.GenerateLiveRequest(start=pb.GenerateLiveStart(
        request=request,
        format=pb.LiveAudioFormat(sample_rate_hz=RATE, encoding=pb.PCM_ENCODING_S16LE)))
    size = RATE * CHUNK_MS // 1000 * 2
    began = time.monotonic()
    for number, at in enumerate(range(0, len(pcm), size), start=1):
        if paced:  # a chunk leaves when its last sample has been spoken
            time.sleep(max(0.0, began + number * CHUNK_MS / 1000 - time.monotonic()))
        yield pb.GenerateLiveRequest(audio=pb.LiveAudioChunk(data=pcm[at:at + size]))
    marks["end"] = time.monotonic()
    yield pb.GenerateLiveRequest(end=pb.LiveAudioEnd())


def stream_live(stub, pcm: bytes, *, paced: bool = True) -> dict:
    marks: dict[str, float] = {}
    text, first = [], None
    for response in stub.GenerateLive(live_messages(pcm, marks, paced=paced), timeout=600):
        if response.text_delta and first is None:
            first = time.monotonic()
        text.append(response.text_delta)
    return {"ttft_after_end_s": first - marks["end"], "text": "".join(text)}


def generate_whole(stub, pcm: bytes) -> dict:
    messages = conversation()
    messages[0].parts.append(pb.Part(audio=pb.Audio(pcm=pb.PcmAudio(
        data=pcm, sample_rate_hz=RATE, encoding=pb.PCM_ENCODING_S16LE))))
    started, text, first = time.monotonic(), [], None
    for response in stub.Generate(pb.GenerateRequest(messages=messages, sampling=GREEDY),
                                  timeout=600):
        if response.text_delta and first is None:
            first = time.monotonic()
        text.append(response.text_delta)
    return {"ttft_s": first - started, "text": "".join(text)}


def embedding_difference(default_bundle, wave: np.ndarray) -> float:
    """Max |streamed - whole| over the clip's embeddings (100 ms appends)."""
    import torch

    from inference_svc.model.encoders import AudioEncoder
    from inference_svc.model.inputs.live_audio import LiveAudio
    from inference_svc.model.inputs.media import DecodedAudio

    decoder_hidden = 576  # SmolLM2-135M
    encoder = AudioEncoder.load(default_bundle / "audio", decoder_hidden, torch.float32)
    whole = encoder.encode([DecodedAudio(wave, RATE)])[0]
    live = LiveAudio(encoder.chunking, digest=b"bench")
    step = RATE * CHUNK_MS // 1000
    for at in range(0, len(wave), step):
        live.append(wave[at:at + step])
        tokens, _ = live.ready()
        if tokens:
            live.embeddings(encoder, tokens)
    live.seal()
    tokens, _ = live.ready()
    return float((live.embeddings(encoder, tokens) - whole).abs().max())


@pytest.fixture(scope="module")
def metered_service(default_bundle, tmp_path_factory):
    port = free_port()
    server = start_server(tmp_path_factory.mktemp("live-bench"), None,
                          "--metrics-port", str(port), timeout=600)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        stream_live(stub, s16(speech(1.0)), paced=False)  # warm up
        generate_whole(stub, s16(speech(1.0)))
        yield stub, port
    server.terminate()


def test_a_30_s_utterance_streamed_answers_within_a_tenth_of_the_whole_clips_ttft(
        metered_service, default_bundle):
    stub, _ = metered_service
    wave = speech(30.0)
    pcm = s16(wave)
    rounds = []
    for n in range(3):
        live = stream_live(stub, pcm)
        whole = generate_whole(stub, pcm)
        rounds.append({"live": live, "whole": whole})
        print(f"round {n + 1}: live {live['ttft_after_end_s']:.3f} s after the end, "
              f"whole {whole['ttft_s']:.3f} s", flush=True)
    live_ttft = median([r["live"]["ttft_after_end_s"] for r in rounds])
    whole_ttft = median([r["whole"]["ttft_s"] for r in rounds])
    same = all(r["live"]["text"] == r["whole"]["text"] for r in rounds)
    difference = embedding_difference(default_bundle, wave)
    report("live_audio_30s", "30 s utterance: streamed in real time (100 ms chunks) vs whole",
           ["path", "time to first token (median of 3)", "ratio"],
           [["GenerateLive, from the end marker", f"{live_ttft:.3f} s",
             f"{live_ttft / whole_ttft:.3f}"],
            ["Generate, whole clip, from the send", f"{whole_ttft:.3f} s", "1"]],
           {"rounds": rounds, "embedding_max_abs_difference": difference,
            "replies_equal": same},
           [f"streamed vs whole embeddings: max abs difference {difference:.2e}; "
            f"greedy replies equal: {same}"])
    assert same


def test_eight_live_streams_in_real_time_keep_up(metered_service):
    stub, port = metered_service
    before = scrape(port)
    count_key = ("autoglm_live_audio_chunk_encode_seconds_count", MODEL)
    results: list[dict] = [{} for _ in range(8)]

    def speaker(index: int) -> None:
        results[index] = stream_live(stub, s16(speech(10.0, seed=index + 1)))

    workers = [threading.Thread(target=speaker, args=(i,)) for i in range(8)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(600)
    after = scrape(port)
    chunks = after[count_key] - before[count_key]
    encode_s = (after[("autoglm_live_audio_chunk_encode_seconds_sum", MODEL)]
                - before[("autoglm_live_audio_chunk_encode_seconds_sum", MODEL)])
    bounds = sorted(float(dict(labels)["le"]) for name, labels in after
                    if name == "autoglm_live_audio_chunk_encode_seconds_bucket")
    def under(bound: float) -> float:
        key = ("autoglm_live_audio_chunk_encode_seconds_bucket",
               tuple(sorted({**dict(MODEL), "le": _le(bound)}.items())))
        return after[key] - before.get(key, 0.0)
    p99_bound = next(b for b in bounds if under(b) >= 0.99 * chunks)
    lags = [r["ttft_after_end_s"] for r in results]
    report("live_audio_8_streams", "8 live streams at once, 10 s each in real time",
           ["chunks encoded", "mean encode s / 640 ms chunk", "p99 encode s (bucket bound)",
            "end -> first token median s", "max s"],
           [[f"{chunks:.0f}", f"{encode_s / chunks:.3f}", f"<= {p99_bound:g}",
             f"{median(lags):.3f}", f"{max(lags):.3f}"]],
           {"streams": [{k: v for k, v in r.items() if k != "text"} for r in results]})
    assert chunks == 8 * 16  # 10 s: 15 whole 640 ms chunks and the partial last, each


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
