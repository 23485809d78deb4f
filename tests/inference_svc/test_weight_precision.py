"""--decoder-weights and --vision-weights through a real server: it answers in int8 and int4,
reports each module's precision and real bytes, and refuses what this machine cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import REPO, ServerProcess, running_server, text_request


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[ServerProcess]:
    """The tiny bundle, its vision encoder in int8 by flag and its decoder by environment."""
    with running_server(tmp_path_factory.mktemp("int8-server"), tiny_bundle,
                        "--vision-weights", "int8",
                        env={"AUTOGLM_DECODER_WEIGHTS": "int8"}) as server:
        yield server


def model_info(target: str) -> dict[str, pb.ModuleInfo]:
    with grpc.insecure_channel(target) as channel:
        info = pb_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
    return {m.name: m for m in info.modules}


def test_an_int8_server_answers(stub):
    replies = list(stub.Generate(text_request("Hello, how are you?", max_new_tokens=6,
                                              min_new_tokens=6)))
    assert replies[-1].final.usage.completion_tokens == 6
    assert "".join(r.text_delta for r in replies)


def test_an_int4_server_answers_and_reports_its_decoder_in_int4(tiny_bundle, tmp_path,
                                                                  inference_server):
    with running_server(tmp_path, tiny_bundle, "--decoder-weights", "int4") as server:
        info, plain = model_info(server.target), model_info(inference_server.target)
        with grpc.insecure_channel(server.target) as channel:
            replies = list(pb_grpc.InferenceServiceStub(channel).Generate(text_request(
                "Hello, how are you?", max_new_tokens=6, min_new_tokens=6)))
    assert replies[-1].final.usage.completion_tokens == 6
    assert {n: m.weight_precision for n, m in info.items()} == {
        "decoder": "int4", "vision": "fp32", "audio": "fp32"}
    assert info["decoder"].parameters == plain["decoder"].parameters
    assert info["decoder"].weight_bytes < plain["decoder"].weight_bytes


def test_model_info_reports_each_modules_precision_and_fewer_bytes(server, inference_server):
    quantized, plain = model_info(server.target), model_info(inference_server.target)
    assert {n: m.weight_precision for n, m in quantized.items()} == {
        "decoder": "int8", "vision": "int8", "audio": "fp32"}
    assert {n: m.weight_precision for n, m in plain.items()} == {
        "decoder": "fp32", "vision": "fp32", "audio": "fp32"}
    for name in ("decoder", "vision"):
        assert quantized[name].parameters == plain[name].parameters
        assert quantized[name].weight_bytes < plain[name].weight_bytes
    assert quantized["audio"].weight_bytes == plain["audio"].weight_bytes


def test_the_memory_account_carries_the_precision_and_the_same_bytes(control, server):
    status = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status
    modules = {m.name: m for m in status.modules}
    info = model_info(server.target)
    for name, module in modules.items():
        assert module.weight_precision == info[name].weight_precision
        assert module.weight_bytes == info[name].weight_bytes
    cpu = next(d for d in status.devices if d.device == "cpu")
    assert cpu.weight_bytes == sum(m.weight_bytes for m in status.modules)


def start_failing(tiny_bundle, *flags: str, env: dict[str, str] | None = None
                  ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inference_svc.cli", "--model-dir", str(tiny_bundle),
         "--port", "0", "--control-socket", "", "--log-format", "json", *flags],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, **(env or {})})


@pytest.mark.parametrize(("flags", "env", "named"), [
    (("--decoder-weights", "fp8"), None, "--decoder-weights fp8: cpu cannot run fp8"),
    ((), {"AUTOGLM_DECODER_WEIGHTS": "fp8"}, "--decoder-weights fp8: cpu cannot run fp8"),
])
def test_a_precision_this_device_cannot_run_is_a_start_up_error_naming_the_flag(
        tiny_bundle, flags, env, named):
    done = start_failing(tiny_bundle, *flags, env=env)
    assert done.returncode == 2
    assert f"autoglm-server: error: {named}" in done.stderr


def test_a_precision_the_flag_does_not_offer_is_refused_naming_it(tiny_bundle):
    done = start_failing(tiny_bundle, "--vision-weights", "int4")
    assert done.returncode == 2
    assert "--vision-weights" in done.stderr and "int4" in done.stderr

