"""The phone agent's workload (tests/bench/phone_agent.py): a short replay that checks
what the service makes of the agent's requests, and the benchmark for K = 1 and K = 4.

Run the benchmark with `make bench-phone`, or
`.venv/bin/python -m pytest tests/bench/test_phone_agent.py -m bench -s`.
"""

from __future__ import annotations

import pytest

from inference_svc.model.glm4v_vision import VisionGeometry
from tests.bench.harness import print_load
from tests.bench.phone_agent import AGENT_MAX_PIXELS, MODELS, Replay, benchmark, measure
from tests.bench.phone_report import reuse, write_report
from tests.bench.phone_screens import SCREEN_SIZE

SERVICE_MAX_PIXELS = 1_003_520  # the service's default budget: 592 tokens a screenshot


def images_sent(messages: list[dict]) -> list[int]:
    """Indexes of the messages that carry an image."""
    return [i for i, m in enumerate(messages) if isinstance(m["content"], list)
            and any(p["type"] == "image_url" for p in m["content"])]


@pytest.mark.timeout(300)
def test_two_agents_get_the_screenshot_tokens_and_their_prefix_back(tmp_path):
    replay = Replay(steps=2, max_tokens=4)
    measured = measure("glm4v-phone", 2, replay, tmp_path, max_pixels=SERVICE_MAX_PIXELS)

    steps = {(s.session, s.step): s for s in measured.steps}
    assert sorted(steps) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    assert all(s.finish_reason in ("stop", "length") and s.stream.completion_tokens >= 1
               for s in steps.values())
    geometry = VisionGeometry()  # the checkpoint's own: 14-px patches, 2x2 merge
    screenshot_tokens = geometry.image_tokens(
        geometry.grid(*SCREEN_SIZE, max_pixels=SERVICE_MAX_PIXELS))
    assert screenshot_tokens == 592
    assert all(s.image_tokens == screenshot_tokens for s in steps.values())
    for session in (0, 1):
        first, second = steps[session, 1], steps[session, 2]
        assert images_sent(second.messages) == [len(second.messages) - 1]
        # the first screenshot was removed, so the prompt grew by its text only
        assert 0 < second.stream.prompt_tokens - first.stream.prompt_tokens < screenshot_tokens
        assert second.stream.cached_prompt_tokens > 0
        assert reuse(second) >= 0.95
    assert sorted(measured.session_kv) == ["agent-0", "agent-1"]
    assert all(entry["bytes"] > 0 for entry in measured.session_kv.values())


@pytest.mark.bench
@pytest.mark.timeout(3600)
def test_phone_agent_workload(tmp_path):
    """Both models, K = 1 and K = 4, three steps: the tables in $BENCH_OUT."""
    replay = Replay(steps=3)
    print_load("phone_agent")
    results = benchmark(MODELS, [1, 4], replay, tmp_path)
    write_report(results, replay, max_pixels=AGENT_MAX_PIXELS)

    for result in results:
        assert len(result.steps) == result.agents * replay.steps
        assert all(s.finish_reason in ("stop", "length") for s in result.steps)
        assert all(reuse(s) >= 0.95 for s in result.steps if s.step > 1), result.model
