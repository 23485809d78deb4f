"""The runner: executes a step plan on the model and chooses the tokens where the logits
are (engine/sampling.py), so only the chosen ids leave the model's device.

A step is one forward when prompts and decode rows run together (the plan gives the
rows' slots: mixed steps), otherwise a prefill pass and a decode pass. A failure is
narrowed down to whom it belongs: a failed mixed pass runs again as its parts; a failed
prefill pass of several prompts runs each prompt alone; a decode pass out of memory
after one retry fails the newest row alone (the others wait a step); any other decode
failure fails every row. Out of memory is retried once after `relieve` frees what it can.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch

from inference_svc.engine.sampling import choose_tokens
from inference_svc.engine.sequences import Sequence
from inference_svc.engine.step import PromptChunk, PromptOutcome, StepOutput, StepPlan
from inference_svc.errors import brief
from inference_svc.model.paged.kv_pool import KVPool, RowSlots

log = structlog.get_logger("engine")


class ModelRunner:
    def __init__(self, model, pool: KVPool, *, relieve: Callable[[], None]) -> None:
        self.model = model
        self.pool = pool
        self.relieve = relieve  # frees idle memory before an out-of-memory retry

    def run(self, plan: StepPlan) -> StepOutput:
        out = StepOutput([PromptOutcome() for _ in plan.chunks], [None] * len(plan.rows))
        ready = [(c, o) for c, o in zip(plan.chunks, out.prompts, strict=True)
                 if self._encode(c, o)]
        if ready and plan.row_slots:
            chunks = [chunk for chunk, _ in ready]
            try:
                logits = self.retrying(lambda: self._forward(chunks, plan.rows, plan.row_slots))
            except Exception as error:  # each part alone, so that only the culprit fails
                log.warning("mixed_pass_failed", error_type=type(error).__name__,
                            error=brief(error), prompts=len(ready), rows=len(plan.rows))
            else:
                self._prompts_done(ready, list(logits[:len(ready)]))
                out.tokens = self._choose(plan.rows, logits[len(ready):])
                return out
        if ready:
            self._prefill(ready)
        if plan.rows:
            self._decode(plan, out)
        return out

    def retrying(self, work):
        """Run `work`; on out-of-memory, relieve memory and try once more."""
        try:
            return work()
        except torch.OutOfMemoryError:
            self.relieve()
            return work()

    # ---- prompts (each with the outcome it reports) --------------------------------------

    def _encode(self, chunk: PromptChunk, outcome: PromptOutcome) -> bool:
        """The prompt's decoder inputs (its media encoded) before its first chunk runs,
        and again from where it has reached when a live prompt grew past them."""
        prefill = chunk.prefill
        inputs = prefill.inputs
        if inputs is None or prefill.inputs_from + len(inputs.embeds) < chunk.end:
            start = prefill.done
            live = prefill.job.live.audio if prefill.job.live else None
            try:
                prefill.inputs = self.retrying(lambda: self.model.prompt_inputs(
                    prefill.plan, prefill.job.media, cached=start, live=live))
            except Exception as error:
                outcome.error = error
                return False
            prefill.inputs_from = start
        return True

    def _prefill(self, ready: list[tuple[PromptChunk, PromptOutcome]]) -> None:
        """The prompts' chunks packed into one forward; each alone when that fails."""
        try:
            logits = list(self.retrying(lambda: self._forward([c for c, _ in ready])))
        except Exception as error:
            if len(ready) == 1:
                ready[0][1].error = error
                return
            log.warning("batched_prefill_failed", error_type=type(error).__name__,
                        error=brief(error), prompts=len(ready))
            logits = [self._alone(chunk, outcome) for chunk, outcome in ready]
        self._prompts_done(ready, logits)

    def _alone(self, chunk: PromptChunk, outcome: PromptOutcome) -> torch.Tensor | None:
        try:
            return self._forward([chunk])[0]
        except Exception as error:
            outcome.error = error
            return None

    def _prompts_done(self, ready: list[tuple[PromptChunk, PromptOutcome]],
                      logits: list[torch.Tensor | None]) -> None:
        """Fresh prompts the step completed choose their choices' first tokens, all in one
        batch (a resumed sequence already has its next token)."""
        firsts = [(chunk.prefill, outcome, row)
                  for (chunk, outcome), row in zip(ready, logits, strict=True)
                  if row is not None and chunk.completes and chunk.prefill.resumed is None]
        if not firsts:
            return
        samplers = [s for prefill, _, _ in firsts for s in prefill.samplers]
        histories = [prefill.history for prefill, _, _ in firsts for _ in prefill.samplers]
        scores = torch.stack([row for prefill, _, row in firsts for _ in prefill.samplers])
        chosen = iter(choose_tokens(samplers, histories, scores))
        for prefill, outcome, _ in firsts:
            outcome.first_tokens = [next(chosen) for _ in prefill.samplers]

    def _forward(self, chunks: list[PromptChunk], rows: list[Sequence] = (),
                 row_slots: list[RowSlots] = ()) -> torch.Tensor:
        """The prompts' chunks, then the rows' next tokens, as the segments of one
        forward; logits after each segment, in that order."""
        spans = [(c.prefill.inputs, c.prefill.done - c.prefill.inputs_from,
                  c.end - c.prefill.inputs_from) for c in chunks]
        inputs = [prompt.embeds[start:stop] for prompt, start, stop in spans]
        inputs += [torch.tensor([s.next_token]) for s in rows]
        positions = None
        if any(prompt.positions is not None for prompt, _, _ in spans) or any(
                s.position_offset for s in rows):
            positions = [None if prompt.positions is None else prompt.positions[:, start:stop]
                         for prompt, start, stop in spans]
            positions += [torch.tensor([[s.length + s.position_offset]]) for s in rows]
        segments = [c.slots for c in chunks] + list(row_slots)
        return self.model.forward_paged(self.pool, segments, inputs, positions)

    # ---- decoding ----------------------------------------------------------------------

    def _decode(self, plan: StepPlan, out: StepOutput) -> None:
        rows = plan.rows
        try:
            logits = self.retrying(lambda: self._decode_pass(plan))
        except torch.OutOfMemoryError as error:
            # still out of memory after relief: the newest row alone fails
            newest = max(range(len(rows)), key=lambda i: rows[i].started)
            out.tokens[newest] = error
            return
        except Exception as error:
            log.error("decode_step_failed", batch=len(rows), error_type=type(error).__name__,
                      error=brief(error), exc_info=error)
            out.tokens = [error] * len(rows)
            return
        out.tokens = self._choose(rows, logits)

    def _decode_pass(self, plan: StepPlan) -> torch.Tensor:
        """Every row feeds its chosen token (a captured CUDA graph where there is one)."""
        rows = plan.rows
        return self.model.decode_paged(self.pool, plan.tables, [s.length for s in rows],
                                       [s.next_token for s in rows],
                                       [s.position_offset for s in rows])

    @staticmethod
    def _choose(rows: list[Sequence], logits: torch.Tensor) -> list:
        return choose_tokens([s.sampler for s in rows], [s.history for s in rows], logits)
