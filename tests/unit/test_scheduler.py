"""The scheduler alone (engine/scheduler.py, kv_room.py, endings.py), driven with no
model: the runner's part is played by step outputs written here. Admission, the step
plan, preemption order, swap against recompute, prefix hits, and how requests end."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from inference_svc.engine.config import EngineConfig
from inference_svc.engine.jobs import RequestHandle
from inference_svc.engine.kv_blocks import BlockLedger
from inference_svc.engine.scheduler import Scheduler
from inference_svc.engine.sequences import Job
from inference_svc.engine.sessions import SessionStore
from inference_svc.engine.step import PromptOutcome, StepOutput, StepPlan
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.modular import DecodedMedia
from inference_svc.model.paged.kv_pool import KVPool
from inference_svc.types import (
    ChatMessage,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TextPart,
)

BLOCK = 4  # tokens per block
CHUNK = 8  # prompt positions per step
TOKEN = 42  # what the stand-in runner chooses
EOS = 2


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Harness:
    """A scheduler over a small CPU block pool, the runner played by hand."""

    def __init__(self, tokenizer, loop, *, budget_blocks: int = 64, mixed: bool = True,
                 prefix_caching: bool = True) -> None:
        pool = KVPool(layer_devices=["cpu"], kv_heads=1, head_dim=2, dtype=torch.float32,
                      block_size=BLOCK, blocks=1)
        self.ledger = BlockLedger(pool, budget_blocks=budget_blocks, min_blocks=4)
        self.sessions = SessionStore(self.ledger, idle_ttl_s=60, device="cpu")
        config = EngineConfig(prefill_chunk_tokens=CHUNK, mixed_steps=mixed,
                              prefix_caching=prefix_caching, kv_block_tokens=BLOCK)
        self.scheduler = Scheduler(config, self.ledger, self.sessions, tokenizer=tokenizer,
                                   eos_ids=[EOS], chunk_tokens=CHUNK)
        self.loop = loop
        self.handles: dict[str, RequestHandle] = {}

    def submit(self, name: str, prompt_tokens: int, *, priority: int = 0, max_new: int = 4,
               first: int = 100) -> None:
        request = GenerationRequest(name, [ChatMessage("user", [TextPart(name)])],
                                    SamplingParams(max_new_tokens=max_new, temperature=0),
                                    priority=priority)
        ids = list(range(first, first + prompt_tokens))
        handle = RequestHandle(request, self.loop)
        self.handles[name] = handle
        self.scheduler.requests.put(Job((0, 0), request, PromptPlan(ids, content=ids),
                                        DecodedMedia([], []), max_new, handle))

    def step(self, token: int = TOKEN) -> StepPlan:
        """Plan a step, run it as a runner that chooses `token` everywhere, settle it."""
        plan = self.scheduler.schedule()
        out = StepOutput(
            [PromptOutcome(first_tokens=[token] * len(c.prefill.samplers)) for c in plan.chunks],
            [token] * len(plan.rows))
        for chunk in plan.chunks:  # what the runner's encoding gives the modular model
            chunk.prefill.inputs = chunk.prefill.inputs or _inputs()
        for tensor in self.ledger.pool.keys + self.ledger.pool.values:
            tensor.zero_()  # what it wrote: finite, so the blocks may be kept for reuse
        self.scheduler.update(plan, out)
        self.scheduler.outbox.deliver()
        return plan

    def final(self, name: str) -> Finished:
        events = self.loop.run_until_complete(_drain(self.handles[name]))
        assert isinstance(events[-1], Finished), events
        return events[-1]

    @property
    def decoding(self) -> list[str]:
        return sorted(self.scheduler.batch.decoding)


def _inputs():
    from inference_svc.model.base import PromptInputs

    return PromptInputs(torch.zeros(0, 2))


async def _drain(handle: RequestHandle) -> list:
    events = []
    try:
        async for event in handle.events():
            events.append(event)
    except Exception as error:
        events.append(error)
    return events


@pytest.fixture
def harness(model, loop):
    return lambda **kw: Harness(model.tokenizer, loop, **kw)


def test_a_step_plans_prompt_chunks_beside_the_decode_rows_that_share_it(harness):
    h = harness()
    h.submit("short", 6)
    plan = h.step()
    assert [(c.prefill.key, c.end) for c in plan.chunks] == [("short", 6)]
    assert plan.rows == [] and plan.row_slots == []
    h.submit("long", 20, first=300)
    plan = h.step()
    # one chunk of positions less the one decode row, never under half a chunk
    assert [(c.prefill.key, c.end) for c in plan.chunks] == [("long", CHUNK - 1)]
    assert [s.key for s in plan.rows] == ["short"]
    assert len(plan.row_slots) == 1  # the row rides in the same forward
    assert len(plan.row_slots[0].write) == 1 and plan.chunks[0].slots.start == 0


def test_without_mixed_steps_the_rows_have_no_slots_in_the_prompts_forward(harness):
    h = harness(mixed=False)
    h.submit("short", 6)
    h.step()
    h.submit("long", 20, first=300)
    plan = h.step()
    assert plan.chunks and plan.rows and plan.row_slots == []
    assert plan.tables == [h.ledger.table("short")]


def test_a_request_ends_at_its_token_limit_and_its_blocks_stay_cached(harness):
    h = harness()
    h.submit("a", 6, max_new=3)
    while h.scheduler.requests.admitted() or h.scheduler.requests.queued:
        h.step()
    final = h.final("a")
    assert final.reason is FinishReason.LENGTH and final.usage.completion_tokens == 3
    account = h.ledger.account()
    assert account.held_blocks == 0 and account.cached_blocks > 0


def test_the_eos_token_ends_a_sequence(harness):
    h = harness()
    h.submit("a", 6, max_new=10)
    h.step(token=EOS)
    assert h.final("a").reason is FinishReason.STOP


def test_a_prompt_already_computed_is_found_by_content_and_not_computed_again(harness):
    h = harness()
    h.submit("first", 24, max_new=1)
    while not h.handles["first"].ended:
        h.step()
    h.submit("second", 24, max_new=1)  # the same prompt
    plan = h.scheduler.schedule()
    prefill = plan.chunks[0].prefill
    assert prefill.cached == 20  # whole blocks, less the one of the last position
    assert plan.chunks[0].slots.start == 20  # its chunk starts there


def test_a_job_that_does_not_fit_waits_and_is_admitted_when_room_comes_back(harness):
    h = harness(budget_blocks=8, prefix_caching=False)
    h.submit("big", 20, max_new=2)  # 5 blocks of 7 usable
    h.submit("waits", 16, first=500)  # 4 more do not fit beside it
    h.step()
    assert [p.key for p in h.scheduler.batch.prefilling] == ["big"]
    assert h.scheduler.requests.queued == 1
    while not h.handles["big"].ended:
        assert h.scheduler.requests.queued == 1  # it waits as long as "big" holds its room
        h.step()
    assert h.final("big").usage.completion_tokens == 2
    h.scheduler.schedule()
    assert [p.key for p in h.scheduler.batch.prefilling] == ["waits"]


def test_a_higher_priority_job_preempts_the_lowest_priority_newest_sequence(harness):
    h = harness(budget_blocks=12, prefix_caching=False)
    h.submit("old", 6, max_new=50)
    h.submit("new", 6, max_new=50, first=300)
    while len(h.decoding) < 2:
        h.step()
    h.submit("urgent", 32, priority=5, first=600)  # 8 blocks; 7 are free
    h.step()
    assert h.decoding == ["old"]
    assert [p.key for p in h.scheduler.batch.prefilling] == ["urgent"]
    assert h.scheduler.requests.preemptions == 1
    # short: let go and recomputed, waiting ahead of fresh jobs of its priority
    waiting = h.scheduler.requests.drain()
    assert [j.request.request_id for j in waiting] == ["new"] and waiting[0].resume is not None
    assert not waiting[0].resume.swapped and "new" not in h.ledger.swapped


def test_decoding_out_of_blocks_preempts_the_newest_and_a_long_one_is_swapped(harness):
    h = harness(budget_blocks=10, prefix_caching=False)
    h.submit("a", 12, max_new=100)
    while "a" not in h.decoding:
        h.step()
    h.submit("b", 12, max_new=100, first=300)
    while "b" not in h.decoding:
        h.step()
    while h.scheduler.requests.preemptions == 0:
        h.step()
    assert h.decoding == ["a"]  # the newest went
    resumed = h.scheduler.requests.drain()[0].resume
    assert resumed.key == "b" and resumed.length > CHUNK
    assert resumed.swapped and "b" in h.ledger.swapped  # longer than a chunk: copied out


def test_a_job_cancelled_while_it_waits_ends_without_taking_blocks(harness):
    h = harness()
    h.submit("gone", 6)
    h.handles["gone"].cancel()
    plan = h.scheduler.schedule()
    h.scheduler.outbox.deliver()
    assert plan.empty
    final = h.final("gone")
    assert final.reason is FinishReason.CANCELLED and final.usage.completion_tokens == 0
    assert h.ledger.account().held_blocks == 0


def test_a_failed_prompt_fails_its_request_alone_and_frees_its_blocks(harness):
    h = harness()
    h.submit("bad", 6)
    h.submit("good", 6, first=300)
    plan = h.scheduler.schedule()
    out = StepOutput([PromptOutcome(error=RuntimeError("encoder broke")) if
                      c.prefill.key == "bad" else PromptOutcome(first_tokens=[TOKEN])
                      for c in plan.chunks], [])
    for chunk in plan.chunks:
        chunk.prefill.inputs = _inputs()
    h.scheduler.update(plan, out)
    h.scheduler.outbox.deliver()
    events = h.loop.run_until_complete(_drain(h.handles["bad"]))
    assert isinstance(events[-1], RuntimeError)
    assert h.decoding == ["good"]
    assert "bad" not in h.ledger.tables


def test_the_stop_marker_cancels_everything_in_flight(harness):
    h = harness()
    h.submit("running", 6, max_new=20)
    h.step()
    h.scheduler.requests.stop()
    assert h.scheduler.schedule() is None
    h.scheduler.outbox.deliver()
    assert h.final("running").reason is FinishReason.CANCELLED
    assert h.ledger.account().held_blocks == 0


def submit_live(h: Harness, name: str, before: list[int]):
    """A live prompt: `before` ahead of the speech, 2 tokens after it; a chunk of speech is
    2 tokens of 10 samples. Returns its LiveAudio."""
    from inference_svc.engine.live_prompt import LivePrompt
    from inference_svc.model.audio_chunks import AudioChunking
    from inference_svc.model.inputs.live_audio import LiveAudio
    from inference_svc.model.inputs.prompt import MediaSpan

    chunking = AudioChunking(token_samples=10, chunk_tokens=2, left_tokens=0, lookahead=0)
    ids = [*before, 8, 9]
    base = PromptPlan(ids, [MediaSpan("audio", 0, len(before), 0, live=True)], content=ids)
    audio = LiveAudio(chunking, digest=name.encode())
    live = LivePrompt(base, audio, placeholder_id=0, context=64)
    request = GenerationRequest(name, [ChatMessage("user", [TextPart("x")])],
                                SamplingParams(max_new_tokens=4, temperature=0))
    h.handles[name] = handle = RequestHandle(request, h.loop)
    h.scheduler.requests.put(Job((0, 0), request, live.plan(), DecodedMedia([], []), 4,
                                 handle, live=live))
    return audio


def test_a_live_prompt_prefills_its_speech_as_it_comes_and_completes_at_its_end(harness):
    h = harness()
    audio = submit_live(h, "live", [1, 2, 3, 4])

    assert [(c.end, c.completes) for c in h.step().chunks] == [(4, False)]
    assert h.step().empty  # nothing more has come: nothing to run, nothing ends
    audio.append(np.zeros(25, "float32"))  # two whole tokens (one chunk) and a half
    assert [(c.end, c.completes) for c in h.step().chunks] == [(6, False)]
    assert h.step().empty and not h.decoding
    audio.append(np.zeros(10, "float32"))
    audio.seal()  # 35 samples: 4 tokens, then the 2 after the speech
    plan = h.step()
    assert [(c.end, c.completes) for c in plan.chunks] == [(10, True)]
    assert plan.chunks[0].prefill.plan.input_ids == [1, 2, 3, 4, 0, 0, 0, 0, 8, 9]
    assert h.decoding == ["live"]
    while h.decoding:
        h.step()
    final = h.final("live")
    assert final.usage.prompt_tokens == 10 and final.usage.audio_tokens == 4
    assert h.ledger.account().held_bytes == 0


def test_a_live_prompt_cancelled_mid_speech_keeps_only_the_text_before_it_cached(harness):
    h = harness()
    audio = submit_live(h, "live", list(range(1, 9)))  # two blocks of text, then speech
    h.step()
    audio.append(np.zeros(80, "float32"))  # 8 tokens: two more blocks, of speech
    h.step()
    assert h.scheduler.batch.prefilling[0].done == 16
    h.handles["live"].cancel()
    h.step()
    account = h.ledger.account()
    assert account.held_bytes == 0
    assert account.cached_bytes == 2 * h.ledger.bytes_per_block  # the text's two blocks


def test_a_live_prompt_preempted_for_room_comes_back_with_its_speech(harness):
    h = harness(budget_blocks=10, prefix_caching=False)
    h.submit("a", 12, max_new=20)  # 8 blocks at its longest
    audio = submit_live(h, "live", list(range(1, 9)))
    audio.append(np.zeros(80, "float32"))  # 8 tokens of speech: 4 blocks with the text
    while h.scheduler.requests.preemptions == 0:
        h.step()
    assert "live" not in [p.key for p in h.scheduler.batch.prefilling]  # gave its blocks up
    assert h.decoding == ["a"]
    while not h.handles["a"].ended:
        h.step()
    audio.seal()
    while not h.handles["live"].ended:
        h.step()
    final = h.final("live")
    assert final.reason is FinishReason.LENGTH
    assert final.usage.prompt_tokens == 8 + 8 + 2 and final.usage.audio_tokens == 8
    assert h.ledger.account().held_bytes == 0
