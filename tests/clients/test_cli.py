"""The `autoglm` CLI against the fake servers: in-process for output and exit codes, as a
subprocess for streaming and terminal encoding."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from autoglm_client.cli import main
from client_fakes import CONTROL_TOKEN, KV_FULL

from tests.support.fake_inference import DEFAULT_REQUEST_ID, FakeInferenceService, FakeUpstream

AUTOGLM = Path(sys.executable).parent / "autoglm"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_prints_reply_then_usage_on_stderr(fake_server, fake_service, capsys):
    code, out, err = run_cli(capsys, "chat", "--target", fake_server.target, "你好")
    assert code == 0
    assert out == "echo: 你好\n"
    assert err.startswith("usage: 2 prompt tokens")
    assert f"finish: stop; request {DEFAULT_REQUEST_ID}" in err


def test_chat_passes_options_through(fake_server, fake_service, capsys, tmp_path):
    image_path = tmp_path / "a.png"
    image_path.write_bytes(PNG)
    code, _, err = run_cli(
        capsys, "chat", "--target", fake_server.target, "hi", "--image", str(image_path),
        "--system", "sys", "--max-new-tokens", "7", "--min-new-tokens", "2", "--temperature", "0",
        "--top-k", "3",
        "--seed", "11", "--stop", "A", "--stop", "B", "--session", "s-9", "--think",
    )  # fmt: skip
    sent = fake_service.requests[-1]
    assert code == 0
    assert "image 1: 1x1 encoded as 224x224" in err
    assert (sent.sampling.max_new_tokens, sent.sampling.min_new_tokens) == (7, 2)
    assert (sent.sampling.top_k, sent.sampling.seed) == (3, 11)
    assert sent.sampling.HasField("temperature")
    assert not sent.sampling.HasField("top_p")
    assert list(sent.sampling.stop_sequences) == ["A", "B"]
    assert (sent.session_id, sent.enable_thinking, sent.return_reasoning) == ("s-9", True, False)
    assert sent.messages[1].parts[1].image.data == PNG


def test_shown_reasoning_is_marked_when_piped(fake_server, fake_service, capsys):
    code, out, _ = run_cli(
        capsys, "chat", "--target", fake_server.target, "q", "--think", "--show-reasoning"
    )
    assert code == 0
    assert out == "<think>\n思考中\n</think>\necho: q\n"


def test_chat_json_prints_one_object(fake_server, fake_service, capsys):
    code, out, _ = run_cli(capsys, "chat", "--target", fake_server.target, "中文", "--json")
    payload = json.loads(out)
    assert code == 0
    assert payload["text"] == "echo: 中文"
    assert payload["finish_reason"] == "stop"
    assert payload["usage"]["completion_tokens"] == 2


def test_rpc_error_exits_1_with_status_name_and_retry_hint(fake_server, fake_service, capsys):
    fake_service.script = KV_FULL
    code, out, err = run_cli(capsys, "chat", "--target", fake_server.target, "hi")
    assert code == 1
    assert out == ""
    assert "RESOURCE_EXHAUSTED: KV budget full" in err
    assert "retry after 1.5 s" in err


def test_unreadable_image_is_a_usage_error(fake_server, fake_service, capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "chat", "--target", fake_server.target, "x", "--image", str(tmp_path / "no.png")
    )
    assert code == 2
    assert "cannot read image file" in err
    assert fake_service.requests == []


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["chat"])
    assert exit_info.value.code == 2


def test_port_comes_from_environment(fake_server, fake_service, capsys, monkeypatch):
    host, _, port = fake_server.target.rpartition(":")
    monkeypatch.setenv("AUTOGLM_PORT", port)
    code, out, _ = run_cli(capsys, "count", "--host", host, "abc")
    assert code == 0
    assert out == "3 prompt tokens (0 image, 0 audio)\n"


def test_info_states_untrained_modules(fake_server, fake_service, capsys):
    code, out, _ = run_cli(capsys, "info", "--target", fake_server.target)
    assert code == 0
    assert "fake-autoglm" in out
    assert "Untrained modules: vision." in out


def test_end_session(fake_server, fake_service, capsys):
    assert run_cli(capsys, "end-session", "--target", fake_server.target, "s-1")[0] == 0
    code, _, err = run_cli(capsys, "end-session", "--target", fake_server.target, "unknown")
    assert code == 1
    assert "NOT_FOUND" in err


def test_status_renders_memory_account(fake_server, fake_service, capsys):
    code, out, _ = run_cli(
        capsys, "status", "--control", fake_server.target, "--token", CONTROL_TOKEN
    )
    assert code == 0
    assert "KV of idle sessions" in out
    assert "会话-1" in out


def test_status_without_token_is_unauthenticated(fake_server, fake_service, capsys, monkeypatch):
    monkeypatch.delenv("AUTOGLM_TOKEN", raising=False)
    code, _, err = run_cli(capsys, "status", "--control", fake_server.target)
    assert code == 1
    assert "UNAUTHENTICATED" in err


def test_status_watch_prints_every_push(fake_server, fake_service, capsys, monkeypatch):
    monkeypatch.setenv("AUTOGLM_TOKEN", CONTROL_TOKEN)
    code, out, _ = run_cli(capsys, "status", "--control", fake_server.target, "--watch")
    assert code == 0
    assert [line for line in out.splitlines() if line.startswith("Requests:")] == [
        f"Requests:    {n} running, 0 queued, 0 completed" for n in range(3)
    ]


def test_chat_streams_each_delta_as_it_arrives(
    fake_server: FakeUpstream, fake_service: FakeInferenceService
):
    """The fake holds back the second delta until this test has read the first one."""
    fake_service.script = fake_service.gated("你好", "世界")
    process = subprocess.Popen(
        [str(AUTOGLM), "chat", "--target", fake_server.target, "hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    received = b""
    while "你好".encode() not in received:
        chunk = os.read(process.stdout.fileno(), 1024)
        assert chunk, "stdout closed before the first delta"
        received += chunk
    fake_service.released.set()
    rest, err = process.communicate(timeout=30)
    assert process.returncode == 0
    assert (received + rest).decode() == "你好世界\n"
    assert err.decode().startswith("usage: ")


def test_chinese_prints_under_an_ascii_locale(
    fake_server: FakeUpstream, fake_service: FakeInferenceService
):
    environment = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C"}
    result = subprocess.run(
        [str(AUTOGLM), "chat", "--target", fake_server.target, "你好世界"],
        capture_output=True,
        env=environment,
        timeout=30,
        check=True,
    )
    assert result.stdout.decode("utf-8") == "echo: 你好世界\n"
