"""The waiting queue and the bookkeeping of what runs (engine/request_queue.py), alone."""

from __future__ import annotations

import pytest

from inference_svc.engine.jobs import Admission
from inference_svc.engine.request_queue import RequestQueue
from inference_svc.engine.sequences import Job
from inference_svc.errors import NotReady, ResourceExhausted
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.types import ChatMessage, GenerationRequest, SamplingParams, TextPart


def job(name: str, priority: int = 0) -> Job:
    request = GenerationRequest(name, [ChatMessage("user", [TextPart(name)])],
                                SamplingParams(), priority=priority)
    return Job((0, 0), request, PromptPlan(input_ids=[1, 2, 3]))


def names(requests: RequestQueue) -> list[str]:
    return [j.request.request_id for j in requests.drain() if j.request is not None]


def test_higher_priority_first_then_arrival_and_a_preempted_job_ahead_of_its_peers():
    requests = RequestQueue(max_queued=8, max_batch=4)
    for entry in (job("a"), job("b"), job("urgent", priority=5), job("c")):
        requests.put(entry)
    first = requests.get(block=False)
    assert first.request.request_id == "urgent"
    requests.requeue_preempted(job("resumed"))
    assert names(requests) == ["resumed", "a", "b", "c"]
    assert requests.queued == 0


def test_a_full_queue_and_a_stopping_one_refuse_with_their_reasons():
    requests = RequestQueue(max_queued=1, max_batch=4)
    requests.put(job("a"))
    with pytest.raises(ResourceExhausted, match="queue is full"):
        requests.put(job("b"))
    requests.stop()
    with pytest.raises(NotReady):
        requests.put(job("c"))
    assert requests.get(block=False).request is None  # the stop marker comes first


def test_what_runs_is_counted_until_retired_and_capacity_follows_admission():
    requests = RequestQueue(max_queued=8, max_batch=2)
    requests.put(job("a"))
    taken = requests.get(block=False)
    assert requests.register(taken) and requests.busy
    assert [j.request.request_id for j in requests.admitted()] == ["a"]
    requests.set_admission(Admission(mode="limited", max_running=1))
    assert requests.full
    requests.retire("a")
    assert not requests.full and not requests.busy and requests.completed == 1
    requests.set_admission(Admission(mode="paused"))
    assert requests.capacity() == 0
