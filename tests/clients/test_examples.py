"""The grpcurl walkthrough, run against a recording stand-in for grpcurl: every request body
it sends must parse as the request message of the method it calls."""

import io
import os
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from PIL import Image

from autoglm.inference.v1 import inference_service_pb2 as pb

SCRIPT = Path(__file__).resolve().parents[2] / "clients" / "examples" / "grpcurl.sh"
RECORDING_GRPCURL = """#!/usr/bin/env bash
call="$GRPCURL_LOG/$(ls "$GRPCURL_LOG" | grep -c args)"
printf '%s\\n' "$@" > "$call.args"
for arg in "$@"; do [[ "$arg" == "@" ]] && cat > "$call.json"; done
exit 0
"""
REQUEST_TYPES = {
    "grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
    "autoglm.inference.v1.InferenceService/GetModelInfo": pb.GetModelInfoRequest,
    "autoglm.inference.v1.InferenceService/CountTokens": pb.CountTokensRequest,
    "autoglm.inference.v1.InferenceService/Generate": pb.GenerateRequest,
    "autoglm.inference.v1.InferenceService/EndSession": pb.EndSessionRequest,
}


@pytest.fixture
def recorded_calls(tmp_path: Path) -> list[tuple[list[str], str | None]]:
    bin_dir, log_dir = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log_dir.mkdir()
    grpcurl = bin_dir / "grpcurl"
    grpcurl.write_text(RECORDING_GRPCURL)
    grpcurl.chmod(0o755)
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GRPCURL_LOG": str(log_dir),
        "AUTOGLM_TARGET": "example:1234",
    }
    subprocess.run(["bash", str(SCRIPT)], env=environment, check=True, capture_output=True)
    calls = []
    for args_file in sorted(log_dir.glob("*.args"), key=lambda p: int(p.stem)):
        body_file = args_file.with_suffix(".json")
        body = body_file.read_text() if body_file.exists() else None
        calls.append((args_file.read_text().splitlines(), body))
    return calls


def test_walkthrough_lists_describes_and_calls_every_rpc(recorded_calls):
    assert recorded_calls[0][0] == ["-plaintext", "example:1234", "list"]
    assert "describe" in recorded_calls[1][0]
    methods = [args[-1] for args, _ in recorded_calls if "-d" in args]
    assert set(methods) == set(REQUEST_TYPES)


def test_every_request_body_matches_its_message(recorded_calls):
    checked = set()
    for args, body in recorded_calls:
        if "-d" not in args:
            continue
        data = body if body is not None else args[args.index("-d") + 1]
        json_format.Parse(data, REQUEST_TYPES[args[-1]]())  # raises on unknown fields
        checked.add(args[-1])
    assert checked == set(REQUEST_TYPES)  # a body of every method was recorded and parsed


def test_generate_sends_a_png_built_on_the_fly(recorded_calls):
    body = next(body for args, body in recorded_calls if args[-1].endswith("/Generate"))
    request = json_format.Parse(body, pb.GenerateRequest())
    image_part = request.messages[-1].parts[-1].image
    assert image_part.mime_type == "image/png"
    assert Image.open(io.BytesIO(image_part.data)).size == (32, 32)
