"""What the scheduler schedules: jobs (requests as they wait and are admitted), a
request's choices, its running sequences and its prompts being prefilled, the batch
that holds them, and the two orderings it decides by: which prompts a step takes, and
which sequence is preempted first."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from inference_svc.engine.delta_stream import DeltaStreamer
from inference_svc.engine.jobs import RequestHandle, RunningInfo
from inference_svc.engine.live_prompt import LivePrompt
from inference_svc.engine.sampling import Sampler
from inference_svc.engine.sessions import Reuse
from inference_svc.engine.text_stream import TextStream
from inference_svc.model.base import PromptInputs
from inference_svc.model.inputs.prompt import PromptPlan
from inference_svc.model.modular import DecodedMedia
from inference_svc.types import ChoiceEnd, GenerationRequest


@dataclass(order=True)
class Job:
    """A request in the waiting queue (or a preempted choice of one), ordered by
    `sort_key`; entries without a request stop or wake the loop."""

    sort_key: tuple[int, int]
    request: GenerationRequest | None = field(compare=False)  # None: stop the loop
    plan: PromptPlan | None = field(compare=False, default=None)
    media: DecodedMedia | None = field(compare=False, default=None)
    max_new_tokens: int = field(compare=False, default=0)
    handle: RequestHandle | None = field(compare=False, default=None)
    enqueued_at: float = field(compare=False, default_factory=time.monotonic)
    resume: Sequence | None = field(compare=False, default=None)  # preempted: to resume
    info: RunningInfo | None = field(compare=False, default=None)  # set once admitted
    waiting: bool = field(compare=False, default=False)  # admission has made it wait
    reuse: Reuse | None = field(compare=False, default=None)  # KV found for it at admission
    wake: bool = field(compare=False, default=False)  # no request: wakes the loop for a task
    preempted: bool = field(compare=False, default=False)  # admitted once: never times out
    live: LivePrompt | None = field(compare=False, default=None)  # speech still arriving

    def again(self, *, resume: Sequence | None) -> Job:
        """The job re-queued after preemption (a fresh one: admission state resets)."""
        return Job(self.sort_key, self.request, self.plan, self.media, self.max_new_tokens,
                   self.handle, resume=resume, preempted=True, live=self.live)


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


@dataclass(eq=False)
class Prefill:
    """A prompt fed through the decoder a chunk at a time, beside decoding sequences."""

    job: Job
    plan: PromptPlan
    cached: int  # positions that came from reused blocks
    done: int  # positions whose KV is in the owner's blocks
    reuse: Reuse | None = None
    resumed: Sequence | None = None  # a preempted sequence being recomputed
    # a fresh prompt: one sampler per choice, which choose the first tokens
    samplers: list[Sampler] = field(default_factory=list)
    history: torch.Tensor | None = None  # the prompt's ids [1, n], what penalties read
    # decoder inputs of the positions from `inputs_from` on; the runner encodes them
    # (media included) when the prompt's first chunk runs, and again from where it has
    # reached when a live prompt has grown past them
    inputs: PromptInputs | None = None
    inputs_from: int = 0

    @property
    def key(self) -> str:
        return self.resumed.key if self.resumed is not None else self.job.request.request_id

    @property
    def remaining(self) -> int:
        return len(self.plan.input_ids) - self.done

    @property
    def reusable(self) -> int:
        """Positions computed that another prompt may find: a live prompt's speech has
        content ids no other prompt has, so only what precedes it."""
        if self.job.live is None:
            return self.done
        return min(self.done, next(s.start for s in self.plan.spans if s.live))

    @property
    def complete(self) -> bool:
        """Every position of the prompt is in KV (a live prompt's input has ended)."""
        return not self.remaining and not self.plan.open


@dataclass
class Batch:
    """What runs on the model thread: prompts being prefilled, sequences decoding, and
    the choices of each request that has started decoding."""

    prefilling: list[Prefill] = field(default_factory=list)
    decoding: dict[str, Sequence] = field(default_factory=dict)  # by sequence key
    choices: dict[str, Choices] = field(default_factory=dict)  # by request id

    def holds(self, request_id: str) -> bool:
        """Some choice or prompt of the request is in the batch."""
        return any(s.job.request.request_id == request_id for s in self.decoding.values()) or \
            any(p.job.request.request_id == request_id for p in self.prefilling)

    def prefills_of(self, request_id: str) -> list[Prefill]:
        return [p for p in self.prefilling if p.job.request.request_id == request_id]


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
    prefilling = [p for p in prefilling if p.remaining]  # a live prompt may await audio
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
