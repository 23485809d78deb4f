"""Error log lines carry what happened, never what the request contained."""

from __future__ import annotations

import json

import pytest
import structlog

from autoglm_common.logging_setup import configure_logging

# Built at run time, so that the source lines a console traceback shows do not hold them.
SECRET = "".join(["patient ", "record ", "4711-"]) * 3
MEDIA_MARK = "".join(["RAW", "MEDIA"])


@pytest.fixture
def restore_structlog():
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


def fail_holding_a_request(prompt: str, media: bytes) -> None:
    pixels = list(media[:50_000])  # a large local of another kind
    raise RuntimeError(f"shape mismatch: {len(pixels)} values vs [1, 3, 224, 224]; "
                       + "tensor([0.1, " * 20_000)


def log_failure() -> None:
    media = MEDIA_MARK.encode() * 30_000
    structlog.contextvars.bind_contextvars(request_id="rid-log", rpc="/x/Generate")
    try:
        fail_holding_a_request(SECRET, media)
    except RuntimeError as error:
        structlog.get_logger("test").exception("rpc_failed", status="INTERNAL",
                                               error=repr(error))


def test_json_exception_lines_have_no_locals_and_a_clipped_message(restore_structlog, capsys):
    configure_logging(fmt="json")
    log_failure()
    line = capsys.readouterr().err.strip()
    assert len(line) < 8_000
    assert SECRET not in line
    assert MEDIA_MARK not in line
    assert "locals" not in line
    event = json.loads(line)
    assert event["request_id"] == "rid-log"
    assert event["level"] == "error"
    [stack] = event["exception"]
    assert stack["exc_type"] == "RuntimeError"
    assert stack["exc_value"].startswith("shape mismatch: 50000 values vs [1, 3, 224, 224]")
    assert stack["exc_value"].endswith("characters)")
    assert [f["name"] for f in stack["frames"]][-1] == "fail_holding_a_request"


def test_console_tracebacks_have_no_locals(restore_structlog, capsys):
    configure_logging(fmt="console")
    log_failure()
    output = capsys.readouterr().err
    assert SECRET not in output
    assert MEDIA_MARK not in output
    assert "fail_holding_a_request" in output
