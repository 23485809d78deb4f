"""`autoglm chat --audio-live` against the real server on a tiny random model: the WAV is
streamed over GenerateLive and the reply printed as `chat` prints one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from autoglm_client import live
from autoglm_client.cli import main

from tests.clients.test_live_client import stereo_wav
from tests.conftest import wav_bytes

GREEDY = ("--temperature", "0", "--max-new-tokens", "6", "--min-new-tokens", "1")
UNREACHABLE = "127.0.0.1:1"  # an RPC there fails with UNAVAILABLE (exit 1), not exit 2


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    path = tmp_path / "question.wav"
    path.write_bytes(wav_bytes(0.3))
    return path


class FakeClock:
    """Stands in for `time` in autoglm_client.live: sleeping moves the clock on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    clock = FakeClock()
    monkeypatch.setattr(live, "time", SimpleNamespace(monotonic=clock.monotonic,
                                                      sleep=clock.sleep))
    return clock


def test_live_reply_is_the_reply_to_the_whole_clip(inference_server, clip, capsys):
    target = ("--target", inference_server.target)
    code, whole, _ = run_cli(capsys, "chat", *target, "Listen.", "--audio", str(clip), *GREEDY)
    assert code == 0
    code, out, err = run_cli(
        capsys, "chat", *target, "Listen.", "--audio-live", str(clip), "--no-pace", *GREEDY)
    assert code == 0
    assert out == whole
    usage, live_line = err.splitlines()
    assert re.search(r", 0 image, [1-9]\d* audio\)", usage)
    assert re.fullmatch(r"live: 0\.30 s of audio; first token \d+\.\d{3} s after its end",
                        live_line)


@pytest.mark.parametrize("system", [[], ["--system", "Be brief."]])
def test_live_audio_alone_needs_no_prompt(inference_server, clip, system, capsys):
    code, out, err = run_cli(capsys, "chat", "--target", inference_server.target,
                             "--audio-live", str(clip), *system, *GREEDY)
    assert code == 0
    assert out.strip()
    assert "live: 0.30 s of audio" in err


def test_live_json_carries_the_audio_and_the_first_token_delay(inference_server, clip, capsys):
    code, out, _ = run_cli(capsys, "chat", "--target", inference_server.target, "Listen.",
                           "--audio-live", str(clip), "--no-pace", "--json", *GREEDY)
    payload = json.loads(out)
    assert code == 0
    assert payload["usage"]["audio_seconds"] == pytest.approx(0.3)
    assert payload["first_token_after_audio_s"] >= 0


def test_live_audio_is_paced_chunk_by_chunk_unless_told_not_to(
        inference_server, tmp_path, fake_clock, capsys):
    clip = tmp_path / "q.wav"
    clip.write_bytes(wav_bytes(0.25))
    target = ("--target", inference_server.target)
    assert run_cli(capsys, "chat", *target, "q", "--audio-live", str(clip), "--chunk-ms", "100",
                   *GREEDY)[0] == 0
    # each chunk leaves when its last sample would have been spoken
    assert fake_clock.sleeps == pytest.approx([0.1, 0.1, 0.05])
    fake_clock.sleeps.clear()
    assert run_cli(capsys, "chat", *target, "q", "--audio-live", str(clip), "--no-pace",
                   *GREEDY)[0] == 0
    assert fake_clock.sleeps == []


def test_bad_live_input_is_an_input_error_before_any_call(tmp_path, clip, capsys):
    stereo = tmp_path / "stereo.wav"
    stereo.write_bytes(stereo_wav())
    code, out, err = run_cli(capsys, "chat", "--target", UNREACHABLE, "hi",
                             "--audio-live", str(stereo))
    assert (code, out) == (2, "")
    assert "live audio is 16 kHz mono 16-bit; this WAV is 16000 Hz, 2 channel(s)" in err
    code, _, err = run_cli(capsys, "chat", "--target", UNREACHABLE, "hi",
                           "--audio-live", str(tmp_path / "missing.wav"))
    assert code == 2
    assert "cannot read audio file" in err
    code, _, err = run_cli(capsys, "chat", "--target", UNREACHABLE, "hi",
                           "--audio-live", str(clip), "--chunk-ms", "0")
    assert code == 2
    assert "chunk_ms must be at least 1, not 0" in err


def test_a_chunk_the_service_refuses_is_an_rpc_error(inference_server, tmp_path, capsys):
    clip = tmp_path / "long.wav"
    clip.write_bytes(wav_bytes(0.7))
    code, out, err = run_cli(capsys, "chat", "--target", inference_server.target, "hi",
                             "--audio-live", str(clip), "--chunk-ms", "600", "--no-pace")
    assert (code, out) == (1, "")
    assert "INVALID_ARGUMENT" in err
    assert "longer than 500 ms" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["chat", "hi", "--audio-live", "a.wav", "--audio", "b.wav"],
     "argument --audio: not allowed with argument --audio-live"),
    (["chat"], "chat needs a prompt (or --audio-live FILE)"),
    (["chat", "hi", "--no-pace"], "--chunk-ms and --no-pace go with --audio-live"),
])
def test_misused_live_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
