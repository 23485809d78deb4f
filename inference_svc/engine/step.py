"""One engine step as data: what the scheduler plans, and what the runner returns.

The scheduler fills a `StepPlan` (which prompts advance how far, which sequences decode,
and the KV slots each writes and reads); the runner executes it on the model and returns
a `StepOutput` (each row's chosen token, each prompt's outcome); the scheduler settles
the step from both. Nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from inference_svc.engine.sampling import Choice
from inference_svc.engine.sequences import Prefill, Sequence
from inference_svc.model.paged.kv_pool import RowSlots


@dataclass(eq=False)
class PromptChunk:
    """The next positions of one prompt: up to `end`, written and read at `slots`."""

    prefill: Prefill
    end: int
    slots: RowSlots

    @property
    def completes(self) -> bool:
        plan = self.prefill.plan
        return self.end == len(plan.input_ids) and not plan.open


@dataclass
class StepPlan:
    chunks: list[PromptChunk] = field(default_factory=list)
    rows: list[Sequence] = field(default_factory=list)  # sequences feeding their next token
    tables: list[list[int]] = field(default_factory=list)  # each row's block table
    # each row's slots, when its token rides in one forward with the chunks (mixed steps)
    row_slots: list[RowSlots] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.chunks or self.rows)


@dataclass
class PromptOutcome:
    """A chunk's result: why it failed, or, for a fresh prompt it completed, the first
    token of each of its request's choices."""

    error: Exception | None = None
    first_tokens: list[Choice] = field(default_factory=list)


@dataclass
class StepOutput:
    prompts: list[PromptOutcome]  # one per chunk, in the plan's order
    # one per row: its next token, why it alone failed, or None when it did not run this
    # step (its length stays; the next step writes the same slot again)
    tokens: list[Choice | None]
