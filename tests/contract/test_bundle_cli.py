"""autoglm-bundle: writing a model directory (the embedded default, or a tiny test model
through the same staging), showing it, refusing to clobber, serving one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from inference_svc.model.cli.bundle import main, write
from tests.conftest import start_server
from tests.fixtures.tiny_models import write_tiny_bundle, write_tiny_glm4v_checkpoint

SCRIPT = Path(sys.executable).parent / "autoglm-bundle"


def show_json(directory: Path, capsys) -> dict:
    capsys.readouterr()  # drop what earlier commands printed
    assert main(["show", "--json", str(directory)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def written_tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    write(write_tiny_bundle, out, force=False)
    return out


def test_show_lists_modules_with_their_bytes(written_tiny, capsys):
    summary = show_json(written_tiny, capsys)
    assert summary["name"] == "tiny-random-glm"
    modules = {m["name"]: m for m in summary["modules"]}
    assert set(modules) == {"decoder", "vision", "audio"}
    for module in modules.values():
        assert module["parameters"] > 0
        # float32 weights, plus the odd int64 buffer (BatchNorm's num_batches_tracked)
        assert module["parameter_bytes"] == pytest.approx(4 * module["parameters"], rel=1e-3)
    assert summary["untrained"] == ["decoder", "vision", "audio"]


def test_show_text_says_which_weights_are_untrained(written_tiny, capsys):
    assert main(["show", str(written_tiny)]) == 0
    out = capsys.readouterr().out
    assert "untrained weights: decoder, vision, audio" in out
    assert "UNTRAINED: tiny random ViT for tests" in out


def test_show_splits_a_glm4v_checkpoint_into_decoder_and_vision_tower(tmp_path, capsys):
    out = write_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    summary = show_json(out, capsys)
    assert summary["kind"] == "Glm4vForConditionalGeneration"
    modules = {m["name"]: m for m in summary["modules"]}
    assert set(modules) == {"decoder", "vision"}
    assert all(m["parameter_bytes"] > 0 for m in modules.values())
    assert summary["untrained"] == ["decoder", "vision"]


def test_existing_non_empty_out_is_refused_without_force(written_tiny, capsys):
    manifest_before = (written_tiny / "manifest.json").read_bytes()
    assert main(["write", str(written_tiny)]) == 1
    err = capsys.readouterr().err
    assert "exists and is not empty" in err and "--force" in err
    assert (written_tiny / "manifest.json").read_bytes() == manifest_before


def test_force_replaces_a_bundle_with_another_kind(tmp_path, capsys):
    out = tmp_path / "model"
    write(write_tiny_bundle, out, force=False)
    write(write_tiny_glm4v_checkpoint, out, force=True)
    assert not (out / "manifest.json").exists()
    assert show_json(out, capsys)["kind"] == "Glm4vForConditionalGeneration"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no staging dir left behind


def test_force_does_not_delete_a_directory_that_is_not_a_bundle(tmp_path, capsys):
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    assert main(["write", "--force", str(tmp_path)]) == 1
    assert "does not hold a bundle" in capsys.readouterr().err
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("kind", ["huge", "tiny", "tiny-glm4v"])  # test models stay in tests/
def test_a_kind_that_is_not_offered_is_a_usage_error(kind, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["write", "--kind", kind, str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert f"invalid choice: '{kind}'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_show_of_a_plain_directory_is_an_error(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 1
    assert "neither a modular bundle" in capsys.readouterr().err


def test_console_script_is_installed(written_tiny):
    if not SCRIPT.exists():
        pytest.fail(f"{SCRIPT} missing: pip install -e . to install the console scripts")
    result = subprocess.run([str(SCRIPT), "show", str(written_tiny)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny-random-glm")


def test_written_tiny_bundle_serves_generate(written_tiny, tmp_path):
    server = start_server(tmp_path / "server", written_tiny)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            request = pb.GenerateRequest(
                messages=[pb.Message(role=pb.ROLE_USER, parts=[pb.Part(text="Hello")])],
                sampling=pb.SamplingParams(max_new_tokens=4, min_new_tokens=1, temperature=0),
            )
            replies = list(stub.Generate(request, timeout=60))
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    finally:
        server.terminate()
    assert replies[-1].HasField("final")
    assert 1 <= replies[-1].final.usage.completion_tokens <= 4
    assert info.details["model"] == "tiny-random-glm"


@pytest.mark.slow
def test_write_builds_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["write", str(out)]) == 0
    summary = show_json(out, capsys)
    assert summary["name"].endswith("(embedded default)")
    assert {m["name"] for m in summary["modules"]} == {"decoder", "vision", "audio"}
    assert summary["untrained"] == ["vision", "audio"]
    assert [p.name for p in tmp_path.iterdir()] == ["default"]  # no staging dir left behind
