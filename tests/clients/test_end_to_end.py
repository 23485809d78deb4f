"""Sync client, async client and CLI against the real server on a tiny random model
(the shared `inference_server` fixture of tests/conftest.py)."""

import io
import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest
from autoglm_client import (
    AsyncInferenceClient,
    ControlClient,
    Final,
    FinishReason,
    InferenceClient,
    InvalidArgumentError,
    Sampling,
    TextDelta,
    image,
    user,
)
from PIL import Image

AUTOGLM = Path(sys.executable).parent / "autoglm"
GREEDY = Sampling(max_new_tokens=8, min_new_tokens=1, temperature=0.0)


@pytest.fixture(scope="module")
def client(inference_server):
    with InferenceClient(inference_server.target, timeout=120) as sync_client:
        yield sync_client


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_stream_ends_with_exactly_one_final(client):
    events = list(client.stream("Say hello.", GREEDY))
    finals = [event for event in events if isinstance(event, Final)]
    assert len(finals) == 1
    assert events[-1] is finals[0]
    assert finals[0].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert 1 <= finals[0].usage.completion_tokens <= 8
    assert finals[0].request_id


def test_count_tokens_agrees_with_generate_usage(client):
    conversation = [{"role": "system", "content": "Be brief."}, "What is 2 + 2?"]
    completion = client.generate(conversation, GREEDY)
    assert client.count_tokens(conversation).prompt_tokens == completion.usage.prompt_tokens


def test_same_seed_gives_same_text(client):
    sampling = Sampling(max_new_tokens=8, min_new_tokens=1, temperature=0.8, seed=1234)
    first = client.generate("Tell me a word.", sampling).text
    assert client.generate("Tell me a word.", sampling).text == first


def test_model_info_describes_modules(client):
    info = client.model_info()
    assert info.context_length > 0
    assert "decoder" in [module.name for module in info.modules]
    assert "text" in info.modalities


def test_image_prompt_reports_image_tokens_and_size(client):
    if "image" not in client.model_info().modalities:
        pytest.skip("the served model takes no images")
    completion = client.generate(user("Describe it.", image(png_bytes(64, 48))), GREEDY)
    assert completion.usage.image_tokens > 0
    assert [(i.original_width, i.original_height) for i in completion.final.images] == [(64, 48)]


def test_bad_input_is_invalid_argument(client):
    with pytest.raises(InvalidArgumentError):
        client.generate(user("x", image(b"\x89PNG\r\n\x1a\n broken")), GREEDY)
    with pytest.raises(InvalidArgumentError):
        client.generate("x", Sampling(max_new_tokens=8, min_new_tokens=1, top_p=2.0))
    with pytest.raises(InvalidArgumentError):
        client.generate([], GREEDY)


async def test_async_client_matches_sync_client(inference_server, client):
    expected = client.generate("Name a colour.", GREEDY).text
    async with AsyncInferenceClient(inference_server.target, timeout=120) as async_client:
        deltas = [
            event.text
            async for event in async_client.stream("Name a colour.", GREEDY)
            if isinstance(event, TextDelta)
        ]
        assert "".join(deltas) == expected
        assert (await async_client.model_info()).name == client.model_info().name


def test_cli_chat_prints_the_reply_and_usage(inference_server, client):
    expected = client.generate("Say hi.", GREEDY).text
    result = subprocess.run(
        [
            str(AUTOGLM),
            "chat",
            "--target",
            inference_server.target,
            "Say hi.",
            "--max-new-tokens",
            "8",
            "--min-new-tokens",
            "1",
            "--temperature",
            "0",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == expected + (
        "" if expected.endswith("\n") or not expected else "\n"
    )
    usage = re.match(r"usage: (\d+) prompt tokens", result.stderr.decode())
    assert usage is not None
    assert int(usage.group(1)) > 0


def test_cli_info_and_count(inference_server):
    info = subprocess.run(
        [str(AUTOGLM), "info", "--target", inference_server.target], capture_output=True, timeout=60
    )
    count = subprocess.run(
        [str(AUTOGLM), "count", "--target", inference_server.target, "hello"],
        capture_output=True,
        timeout=60,
    )
    assert info.returncode == 0, info.stderr.decode()
    assert "decoder" in info.stdout.decode()
    assert count.returncode == 0, count.stderr.decode()
    assert re.match(r"[1-9]\d* prompt tokens", count.stdout.decode())


def test_control_status(inference_server):
    with ControlClient(inference_server.control_target) as control:
        status = control.memory_status()
    assert status.pid == inference_server.pid
    assert {module.name for module in status.modules} >= {"decoder"}
    result = subprocess.run(
        [str(AUTOGLM), "status", "--control", inference_server.control_target],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert f"pid {inference_server.pid}" in result.stdout.decode()


def test_cli_counts_audio_tokens(inference_server, client, tmp_path):
    if "audio" not in client.model_info().modalities:
        pytest.skip("the served model takes no audio")
    clip = tmp_path / "tone.wav"
    with wave.open(str(clip), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(16000)
        writer.writeframes(b"\x00\x10" * 16000)
    result = subprocess.run(
        [str(AUTOGLM), "count", "--target", inference_server.target, "hi", "--audio", str(clip)],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    audio_tokens = re.search(r"(\d+) audio\)", result.stdout.decode())
    assert audio_tokens is not None
    assert int(audio_tokens.group(1)) > 0
