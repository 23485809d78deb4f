"""What the model loop schedules: a request's choices, its running sequences and its
prompts being prefilled, and the two orderings the loop decides by: which prompts a
prefill pass takes, and which sequence is preempted first."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inference_svc.engine.delta_stream import DeltaStreamer
from inference_svc.engine.jobs import Job, RunningInfo
from inference_svc.engine.sampling import Sampler
from inference_svc.engine.sessions import Reuse
from inference_svc.engine.text_stream import TextStream
from inference_svc.model.base import PromptInputs
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.types import ChoiceEnd


@dataclass
class Choices:
    """The sequences of one request (n of them, one per choice) and how those that ended
    ended. `over`: the request has ended (failed); what is left of it is let go. The
    list is emptied when the request ends (its sequences point back here)."""

    n: int
    sequences: list[Sequence] = field(default_factory=list)
    ends: dict[int, ChoiceEnd] = field(default_factory=dict)
    over: bool = False

    @property
    def generated(self) -> int:
        return sum(s.generated for s in self.sequences)


@dataclass
class Sequence:
    job: Job
    info: RunningInfo
    sampler: Sampler
    history: torch.Tensor
    streamer: DeltaStreamer
    text: TextStream
    reuse: Reuse | None
    started: float
    length: int  # positions whose KV is in its blocks
    position_offset: int  # rope position of a token = its index + this (see PromptInputs)
    next_token: int = 0  # chosen, not yet fed
    pending_logits: torch.Tensor | None = None  # from prefill, until the first token
    swapped: bool = False  # preempted with its blocks copied to host memory
    index: int = 0  # which of the request's choices
    choices: Choices | None = None  # its request's choices (itself among them)

    @property
    def key(self) -> str:
        """Its owner name in the ledger: the request id, or `id#i` for choice i > 0."""
        return choice_key(self.job.request.request_id, self.index)

    @property
    def generated(self) -> int:
        return len(self.streamer.token_ids)

    @property
    def content(self) -> list[int]:
        return self.job.plan.content + self.streamer.token_ids


@dataclass
class Prefill:
    """A prompt fed through the decoder a chunk at a time, between decode steps."""

    job: Job
    plan: PromptPlan
    inputs: PromptInputs  # decoder inputs of the positions from `cached` on
    cached: int  # positions that came from reused blocks
    done: int  # positions whose KV is in the owner's blocks
    reuse: Reuse | None = None
    resumed: Sequence | None = None  # a preempted sequence being recomputed

    @property
    def key(self) -> str:
        return self.resumed.key if self.resumed is not None else self.job.request.request_id

    @property
    def remaining(self) -> int:
        return len(self.plan.input_ids) - self.done


def choice_key(request_id: str, index: int) -> str:
    """The ledger owner of a request's choice: the request id itself for choice 0."""
    return request_id if index == 0 else f"{request_id}#{index}"


def victim_order(sequence: Sequence) -> tuple[int, float]:
    """Preempted first: lowest priority, then the newest."""
    return sequence.job.request.priority, -sequence.started


def resume_plan(sequence: Sequence) -> PromptPlan:
    """What a preempted sequence recomputes: all it had but its last, unfed token."""
    job = sequence.job
    fed = sequence.history[0, :-1].tolist()
    return PromptPlan(input_ids=fed, spans=job.plan.spans,
                      content=job.plan.content + fed[len(job.plan.input_ids):])


def pick_prefill_work(prefilling: list[Prefill], budget: int, *, long_passed_over: bool
                      ) -> tuple[list[tuple[Prefill, int]], bool]:
    """One prefill pass of about `budget` positions: (prompt, position it reaches).

    Prompts that fit the pass whole go first (oldest first) and, when any do, get the
    pass to themselves, so their first token waits for no part of a long prompt; the
    long prompt then has the next pass (it is never passed over twice running). A tail
    of under half a budget rides with the rest of its prompt: a 160-position prompt is
    one pass, not 128 then 32 (every pass reads all the weights once more), so a pass
    is at most 1.5 budgets. Also returns whether this pass left a long prompt out.
    """
    room = budget + budget // 2
    whole = [p for p in prefilling if p.remaining <= room]
    longer = [p for p in prefilling if p.remaining > room]
    work: list[tuple[Prefill, int]] = []
    if whole and not long_passed_over:
        for prefill in whole:
            if prefill.remaining > room:
                break
            work.append((prefill, prefill.done + prefill.remaining))
            room -= prefill.remaining
        return work, bool(longer)
    for prefill in longer + whole:
        take = min(prefill.remaining, budget)
        work.append((prefill, prefill.done + take))
        budget -= take
        if budget <= 0:
            break
    return work, False
