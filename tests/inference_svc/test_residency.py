"""Residency tiers: offload and reload under traffic, idle demotion, pressure image size."""

from __future__ import annotations

import threading

import grpc
import pytest
from PIL import Image

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.control.v1 import control_service_pb2_grpc as cgrpc
from autoglm.inference.v1 import inference_service_pb2 as pb
from autoglm.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.conftest import png_bytes, start_server
from tests.support.polling import wait_until


def request(text: str, image: bytes | None = None, tokens: int = 6) -> pb.GenerateRequest:
    parts = [pb.Part(text=text)]
    if image is not None:
        parts.append(pb.Part(image=pb.Image(data=image, mime_type="image/png")))
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=parts)],
        sampling=pb.SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, seed=11,
                                   temperature=0.8))


def run(stub, req) -> tuple[str, pb.FinalMessage]:
    responses = list(stub.Generate(req))
    return "".join(r.text_delta for r in responses), responses[-1].final


def tier_of(control, name: str) -> int:
    modules = control.GetMemoryStatus(cpb.GetMemoryStatusRequest()).status.modules
    return {m.name: m.tier for m in modules}[name]


@pytest.fixture
def server(tiny_bundle, tmp_path):
    # prefix caching off: every request runs its encoders, so outputs depend on reloads
    process = start_server(tmp_path / "s", tiny_bundle, "--no-prefix-caching")
    yield process
    process.terminate()


def test_mixed_traffic_survives_repeated_offload_and_reload(server):
    requests = [request(f"image {i}", png_bytes(color=(i * 40, 10, 10))) for i in range(4)]
    requests += [request(f"text {i}") for i in range(4)]
    with grpc.insecure_channel(server.target) as public, \
            grpc.insecure_channel(server.control_target) as private:
        stub, control = pb_grpc.InferenceServiceStub(public), cgrpc.ControlServiceStub(private)
        expected = [run(stub, r)[0] for r in requests]
        stop = threading.Event()
        moves = 0

        def churn() -> None:
            nonlocal moves
            while not stop.is_set():
                control.OffloadModules(cpb.OffloadModulesRequest(modalities=["image"],
                                                                 tier=cpb.TIER_DISK))
                control.ReloadModules(cpb.ReloadModulesRequest(modalities=["image"]))
                moves += 1

        results: dict[int, str] = {}
        errors: list[BaseException] = []

        def client(index: int) -> None:
            try:
                for _ in range(3):
                    text, _ = run(stub, requests[index])
                    assert text == expected[index]
                results[index] = text
            except BaseException as error:  # collected and re-raised in the test thread
                errors.append(error)

        churner = threading.Thread(target=churn)
        churner.start()
        clients = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        stop.set()
        churner.join()
    assert not errors, errors[0]
    assert [results[i] for i in range(len(requests))] == expected
    assert moves >= 2


def test_idle_encoders_are_demoted_and_come_back_on_demand(tiny_bundle, tmp_path):
    server = start_server(tmp_path / "s", tiny_bundle, "--encoder-idle-offload", "0.4")
    try:
        with grpc.insecure_channel(server.target) as public, \
                grpc.insecure_channel(server.control_target) as private:
            stub, control = pb_grpc.InferenceServiceStub(public), cgrpc.ControlServiceStub(private)
            wait_until(lambda: tier_of(control, "audio") == cpb.TIER_DISK, 30,
                       "the idle audio encoder demoted to disk")
            _, final = run(stub, request("look", png_bytes()))
            assert final.usage.image_tokens > 0
            # just used: back home; audio stays demoted, the decoder is never demoted
            assert tier_of(control, "vision") == cpb.TIER_CPU
            assert tier_of(control, "audio") == cpb.TIER_DISK
            assert tier_of(control, "decoder") == cpb.TIER_CPU
        events = [e for e in server.log_lines() if e.get("event") == "encoders_demoted"]
        # what was demoted, and where to (the bytes it freed are measured, and noisy)
        assert events and "audio" in events[0]["modalities"]
        assert events[0]["tier"] == "disk"
    finally:
        server.terminate()


def test_images_are_resized_to_the_pixel_budget_and_smaller_under_pressure(server):
    big = Image.new("RGB", (2000, 1000), (10, 200, 10))
    import io

    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    with grpc.insecure_channel(server.target) as public, \
            grpc.insecure_channel(server.control_target) as private:
        stub, control = pb_grpc.InferenceServiceStub(public), cgrpc.ControlServiceStub(private)
        _, relaxed = run(stub, request("big", buffer.getvalue(), tokens=1))
        control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_LIMITED,
                                                     max_running=4))
        _, pressed = run(stub, request("big", buffer.getvalue(), tokens=1))
        control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_OPEN))
    normal, small = relaxed.images[0], pressed.images[0]
    assert (normal.original_width, normal.original_height) == (2000, 1000)
    assert normal.width * normal.height <= 1_003_520
    assert small.width * small.height <= 200_704
    assert small.width * small.height < normal.width * normal.height
    assert abs(small.width / small.height - 2.0) < 0.05  # aspect ratio kept
