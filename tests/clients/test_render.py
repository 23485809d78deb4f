"""Terminal rendering of sizes, tables, model info, memory status and usage."""

import pytest
from autoglm_client import Final, FinishReason, ImageSize, Usage
from autoglm_client.render import (
    format_bytes,
    memory_status_text,
    model_info_text,
    table,
    usage_text,
)
from client_fakes import memory_status_sample

from autoglm.inference.v1 import inference_service_pb2 as pb


@pytest.mark.parametrize(
    ("count", "expected"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (10_600_000_000, "9.9 GiB")],
)
def test_format_bytes(count: int, expected: str) -> None:
    assert format_bytes(count) == expected


def test_table_aligns_wide_characters() -> None:
    rendered = table(["ID", "N"], [["会话", 1], ["ab", 22]]).splitlines()
    assert rendered == ["ID    N", "会话  1", "ab    22"]


def test_empty_table_says_none() -> None:
    assert table(["A"], []).splitlines()[1] == "(none)"


def test_model_info_names_untrained_modules() -> None:
    info = pb.GetModelInfoResponse(
        name="m",
        modules=[
            pb.ModuleInfo(name="decoder", trained=True, tier=pb.TIER_CPU, device="cpu"),
            pb.ModuleInfo(name="vision", trained=False, tier=pb.TIER_DISK),
            pb.ModuleInfo(name="audio", trained=False, tier=pb.TIER_CPU),
        ],
    )
    text = model_info_text(info)
    assert "Untrained modules: vision, audio." in text
    assert "NO" in text.splitlines()[-3]


def test_model_info_all_trained() -> None:
    info = pb.GetModelInfoResponse(name="m", modules=[pb.ModuleInfo(name="decoder", trained=True)])
    assert model_info_text(info).endswith("All modules are trained.")


def test_memory_status_lists_every_section() -> None:
    text = memory_status_text(memory_status_sample())
    assert "limited (max 2 running)" in text
    assert "4.0 MiB of 512.0 MiB budget" in text
    assert "Process RSS: 900.0 MiB" in text
    assert "req-7" in text
    assert "会话-1" in text
    assert "disk" in text


def test_usage_text_reports_tokens_and_images() -> None:
    final = Final(
        finish_reason=FinishReason.STOP_SEQUENCE,
        usage=Usage(prompt_tokens=10, completion_tokens=3, image_tokens=4),
        matched_stop_sequence="END",
        images=(ImageSize(224, 224, 640, 480),),
        request_id="r1",
    )
    lines = usage_text(final).splitlines()
    assert lines[0].startswith("usage: 10 prompt tokens (0 cached, 4 image, 0 audio),")
    assert "finish: stop_sequence 'END'; request r1" in lines[0]
    assert lines[1] == "image 1: 640x480 encoded as 224x224"
