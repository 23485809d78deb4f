"""Which prompts a prefill pass takes: whole short prompts first, long ones a budget at
a time, and a tail under half a budget in the same pass as the rest of its prompt."""

from __future__ import annotations

from inference_svc.engine.sequences import Prefill, pick_prefill_work
from inference_svc.model.inputs.prompt import PromptPlan

BUDGET = 128


def prompt(length: int, done: int = 0) -> Prefill:
    # the job and the decoder inputs play no part in the choice
    return Prefill(job=None, plan=PromptPlan(list(range(length))), inputs=None, cached=0,
                   done=done)


def reaches(work: list[tuple[Prefill, int]]) -> list[int]:
    return [end for _, end in work]


def test_a_prompt_with_a_short_tail_is_one_pass():
    work, _ = pick_prefill_work([prompt(164)], BUDGET, long_passed_over=False)
    assert reaches(work) == [164]


def test_a_longer_prompt_goes_a_budget_at_a_time_until_its_tail_fits():
    long = prompt(400)
    passes = []
    while long.remaining:
        work, _ = pick_prefill_work([long], BUDGET, long_passed_over=False)
        long.done = work[0][1]
        passes.append(long.done)
    assert passes == [128, 256, 400]  # the last pass takes 144: a 16-position tail rides


def test_whole_prompts_go_before_a_long_one_which_has_the_next_pass():
    long, short, other = prompt(4000), prompt(100), prompt(90)
    work, passed_over = pick_prefill_work([long, short, other], BUDGET, long_passed_over=False)
    assert [p for p, _ in work] == [short, other] and passed_over  # 190 <= 1.5 budgets
    work, passed_over = pick_prefill_work([long], BUDGET, long_passed_over=True)
    assert reaches(work) == [128] and not passed_over
