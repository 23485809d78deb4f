"""GLM-4.1V of AutoGLM-Phone-9B's image geometry: token counts, vision accounting, pressure.

The checkpoint is tiny and random but cuts images as the real one does, so a 1080x2400
screenshot costs the image tokens the real processor computes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image
from transformers import Glm4vImageProcessorPil, Glm4vVisionConfig

from autoglm.control.v1 import control_service_pb2 as cpb
from autoglm.inference.v1 import inference_service_pb2 as pb
from inference_svc.model.glm4v import Glm4vModel
from inference_svc.model.glm4v_vision import (
    GLM4V_MAX_PIXELS,
    GLM4V_MIN_PIXELS,
    TowerShape,
    VisionGeometry,
    activation_bytes,
)
from inference_svc.types import ChatMessage, ImagePart, TextPart
from tests.conftest import ServerProcess, running_server
from tests.fixtures.tiny_models import write_tiny_phone_glm4v_checkpoint

SCREEN = (1080, 2400)
AGENT_MAX_PIXELS = 5_000_000  # Open-AutoGLM's vLLM command: mm_processor_kwargs max_pixels
PRESSURE_MAX_PIXELS = 200_704
ACTIVATION_BUDGET_MB = 100  # the tiny tower needs ~160 MiB for a full screenshot


def screenshot(size: tuple[int, int] = SCREEN) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def real_processor_tokens(size: tuple[int, int], max_pixels: int) -> int:
    """What transformers' GLM-4.1V image processor, configured as GLM-4.1V-9B-Thinking's
    preprocessor_config.json, makes of an image of this size."""
    processor = Glm4vImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": GLM4V_MIN_PIXELS, "longest_edge": max_pixels})
    grid = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // 2**2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_phone_glm4v_checkpoint(tmp_path_factory.mktemp("phone") / "glm4v-phone")


# ---- geometry -----------------------------------------------------------------------


@pytest.mark.parametrize(("max_pixels", "tokens"), [(GLM4V_MAX_PIXELS, 3354),
                                                    (AGENT_MAX_PIXELS, 3108),
                                                    (1_003_520, 592),
                                                    (PRESSURE_MAX_PIXELS, 112)])
def test_screenshot_tokens_match_the_real_processor(max_pixels, tokens):
    assert real_processor_tokens(SCREEN, max_pixels) == tokens
    geometry = VisionGeometry()
    assert geometry.image_tokens(geometry.grid(*SCREEN, max_pixels=max_pixels)) == tokens


def test_checkpoint_has_the_real_image_geometry(checkpoint):
    model = Glm4vModel(checkpoint)
    assert model.geometry == VisionGeometry(14, 2, 2, GLM4V_MIN_PIXELS, GLM4V_MAX_PIXELS)
    messages = [ChatMessage("user", [ImagePart(screenshot(), "image/png", "f"),
                                     TextPart("{\"current_app\": \"System Home\"}")])]
    media = model.decode_media(messages, max_pixels=AGENT_MAX_PIXELS)
    plan = model.plan(messages, media, enable_thinking=True)
    assert media.grids == [(1, 168, 74)]
    assert plan.image_tokens == real_processor_tokens(SCREEN, AGENT_MAX_PIXELS) == 3108
    assert media.images[0].image.size == (1036, 2352)
    assert model.context_length >= 25_480


def test_activation_estimate_of_the_real_tower():
    """The 9B's tower (1536 wide, 12 heads) on one 1080x2400 screenshot in bf16: eager
    attention's scores dominate; SDPA's fused kernels keep none."""
    config = Glm4vVisionConfig()
    patches = [168 * 74]
    config._attn_implementation = "eager"
    eager = activation_bytes(TowerShape.of(config, torch.bfloat16), patches)
    config._attn_implementation = "sdpa"
    fused = activation_bytes(TowerShape.of(config, torch.bfloat16), patches)
    scores = 12 * patches[0] ** 2 * (2 + 4)
    assert scores < eager < scores * 1.1
    assert fused < eager / 10


# ---- through a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("phone-server"), checkpoint,
        "--max-pixels", str(AGENT_MAX_PIXELS), "--pressure-max-pixels", str(PRESSURE_MAX_PIXELS),
        "--activation-budget-mb", str(ACTIVATION_BUDGET_MB),
    ) as server:
        yield server


def request(image: bytes) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[pb.Message(role=pb.ROLE_USER, parts=[
            pb.Part(image=pb.Image(data=image, mime_type="image/png")),
            pb.Part(text="What is on the screen?"),
        ])],
        sampling=pb.SamplingParams(max_new_tokens=2, temperature=0, seed=1),
    )


def final_of(stub, message: pb.GenerateRequest) -> pb.FinalMessage:
    return list(stub.Generate(message))[-1].final


def test_count_tokens_of_a_screenshot_is_the_real_processors(stub):
    counted = stub.CountTokens(pb.CountTokensRequest(messages=request(screenshot()).messages))
    assert counted.image_tokens == 3108


def test_a_screenshot_over_the_activation_budget_is_refused_before_the_tower_runs(stub):
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request(screenshot())))
    error = raised.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "encoder activations" in error.details()
    info = error_details_pb2.ErrorInfo()
    assert rpc_status.from_call(error).details[0].Unpack(info)
    assert info.metadata["resource"] == "encoder_activations"


def test_usage_reports_the_size_glm4v_resized_to(stub):
    final = final_of(stub, request(screenshot((540, 1200))))
    image = final.images[0]
    assert (image.original_width, image.original_height) == (540, 1200)
    assert (image.width, image.height) == (532, 1204)  # multiples of 28, within the budget
    assert not image.reduced_under_pressure
    assert final.usage.image_tokens == real_processor_tokens((540, 1200), AGENT_MAX_PIXELS)


def test_under_pressure_the_screenshot_shrinks_by_glm4v_rule_and_fits(stub, control):
    control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_LIMITED,
                                                 max_running=4, lease_seconds=60))
    try:
        counted = stub.CountTokens(pb.CountTokensRequest(messages=request(screenshot()).messages))
        final = final_of(stub, request(screenshot()))
    finally:
        control.SetAdmission(cpb.SetAdmissionRequest(mode=cpb.ADMISSION_MODE_OPEN))
    expected = real_processor_tokens(SCREEN, PRESSURE_MAX_PIXELS)
    assert counted.image_tokens == final.usage.image_tokens == expected == 112
    image = final.images[0]
    assert (image.width, image.height) == (196, 448)
    assert image.reduced_under_pressure
    assert (image.original_width, image.original_height) == SCREEN
