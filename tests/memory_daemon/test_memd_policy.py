"""The policy over synthetic traces on a fake clock (the policy is given `now`)."""

import dataclasses
import itertools
import math

from memory_daemon.config import CooldownConfig, PolicyConfig
from memory_daemon.policy import (
    Action,
    ActionKind,
    Admission,
    Level,
    PolicyState,
    ServiceView,
    decide,
    poll_interval,
)
from memory_daemon.readings import DeviceReading

TOTAL = 1_000_000
GPU_A = "GPU-aaaa"
GPU_B = "GPU-bbbb"

Frame = dict[str, float | None]


def reading(device: str, t: float, fraction: float | None) -> DeviceReading:
    if fraction is None:
        return DeviceReading.failed(device, t, "NVMLError_GpuIsLost")
    used = round(fraction * TOTAL)
    return DeviceReading(device, t, TOTAL, used, TOTAL - used)


def run(
    frames: list[tuple[float, Frame]],
    config: PolicyConfig | None = None,
    state: PolicyState | None = None,
    service: ServiceView | None = None,
) -> tuple[list[tuple[float, Action]], PolicyState]:
    config = config or PolicyConfig()
    state = state or PolicyState()
    taken: list[tuple[float, Action]] = []
    for t, frame in frames:
        readings = [reading(device, t, fraction) for device, fraction in frame.items()]
        decision = decide(readings, state, config, now=t, service=service)
        state = decision.state
        taken.extend((t, action) for action in decision.actions)
    return taken, state


def steady(start: float, seconds: int, frame: Frame) -> list[tuple[float, Frame]]:
    return [(start + i, dict(frame)) for i in range(seconds)]


def kinds(taken: list[tuple[float, Action]]) -> list[str]:
    return [
        f"{a.kind.value}:{a.admission.name.lower()}"
        if a.kind is ActionKind.SET_ADMISSION
        else a.kind.value
        for _, a in taken
    ]


NO_PERIODIC_GC = PolicyConfig(gc_every_seconds=0)


def test_no_action_below_the_soft_mark():
    taken, state = run(steady(0, 300, {GPU_A: 0.79}), NO_PERIODIC_GC)
    assert taken == []
    assert state.devices[GPU_A].level is Level.NORMAL


def test_sustained_pressure_climbs_the_ladder_in_order_one_step_per_tick():
    taken, state = run(steady(0, 8, {GPU_A: 0.85}), NO_PERIODIC_GC)
    assert kinds(taken) == [
        "collect_garbage",
        "trim_kv",
        "offload_encoders",
        "set_admission:limited",
        "set_admission:paused",
    ]
    times = [t for t, _ in taken]
    assert times == [2, 3, 4, 5, 6]  # 3 samples over 2 s before acting, then one per tick
    assert taken[3][1].admission_limit == PolicyConfig().admission_limit
    assert state.devices[GPU_A].level is Level.SOFT


def test_soft_pressure_waits_for_the_minimum_samples_and_seconds():
    config = dataclasses.replace(NO_PERIODIC_GC, min_samples_above_soft=5, min_seconds_above_soft=0)
    taken, _ = run(steady(0, 5, {GPU_A: 0.85}), config)
    assert [t for t, _ in taken] == [4]


def test_trim_target_is_the_reclaim_down_to_the_exit_mark():
    taken, _ = run(steady(0, 4, {GPU_A: 0.85}), NO_PERIODIC_GC)
    trim = next(a for _, a in taken if a.kind is ActionKind.TRIM_KV)
    assert trim.target_bytes == round((0.85 - 0.70) * TOTAL)


def test_hard_mark_acts_at_once():
    taken, state = run([(0, {GPU_A: 0.5}), (1, {GPU_A: 0.95})], NO_PERIODIC_GC)
    assert [(t, a.kind, a.rule) for t, a in taken] == [
        (1, ActionKind.COLLECT_GARBAGE, "hard_mark:collect_garbage")
    ]
    assert state.devices[GPU_A].level is Level.HARD


def test_a_step_that_met_the_target_restarts_the_ladder_instead_of_escalating():
    frames = [*steady(0, 3, {GPU_A: 0.85}), (3, {GPU_A: 0.65}), *steady(20, 3, {GPU_A: 0.75})]
    taken, _ = run(frames, NO_PERIODIC_GC)
    assert kinds(taken) == ["collect_garbage", "collect_garbage", "trim_kv", "offload_encoders"]


def test_fast_oscillation_around_the_soft_mark_never_acts():
    frames = [(t, {GPU_A: 0.81 if t % 2 else 0.79}) for t in range(400)]
    taken, state = run(frames, NO_PERIODIC_GC)
    assert taken == []
    assert state.devices[GPU_A].level is Level.NORMAL


def test_oscillation_around_the_exit_mark_does_not_flap_levels_or_admission():
    frames = [*steady(0, 8, {GPU_A: 0.85})]
    frames += [(t, {GPU_A: 0.69 if t % 2 else 0.71}) for t in range(8, 400)]
    config = NO_PERIODIC_GC
    taken, state = run(frames, config)
    admission = [a.admission for _, a in taken if a.kind is ActionKind.SET_ADMISSION]
    assert admission == [Admission.LIMITED, Admission.PAUSED]
    assert state.devices[GPU_A].level is Level.SOFT
    gc_times = [t for t, a in taken if a.kind is ActionKind.COLLECT_GARBAGE]
    assert len(gc_times) <= 400 / config.cooldown_seconds.collect_garbage + 1


def test_trend_acts_before_a_fast_ramp_crosses_the_hard_mark():
    ramp = [(float(t), {GPU_A: 0.50 + 0.02 * t}) for t in range(30)]
    taken, _ = run(ramp, NO_PERIODIC_GC)
    first_time, first = taken[0]
    crosses_hard = next(t for t, frame in ramp if frame[GPU_A] >= 0.92)
    crosses_soft_sustained = next(t for t, frame in ramp if frame[GPU_A] >= 0.80) + 2
    assert first.rule.startswith("trend:")
    assert first_time < crosses_soft_sustained < crosses_hard


def test_slow_growth_above_the_exit_mark_does_not_trigger_the_trend():
    ramp = [(float(t), {GPU_A: 0.70 + 0.0005 * t}) for t in range(100)]
    taken, _ = run(ramp, NO_PERIODIC_GC)
    assert taken == []


def test_holds_back_while_usage_falls_fast():
    falling = [(t, {GPU_A: 0.90 - 0.04 * t}) for t in range(6)]
    taken, state = run(falling, NO_PERIODIC_GC)
    assert taken == []
    assert state.devices[GPU_A].level is Level.SOFT
    steady_pressure = steady(0, 6, {GPU_A: 0.82})
    taken, _ = run(steady_pressure, NO_PERIODIC_GC)
    assert kinds(taken)[:2] == ["collect_garbage", "trim_kv"]


def test_cooldowns_are_respected_when_pressure_returns():
    cooldowns = CooldownConfig(collect_garbage=10)
    config = dataclasses.replace(NO_PERIODIC_GC, cooldown_seconds=cooldowns)
    frames = [*steady(0, 3, {GPU_A: 0.85}), (3, {GPU_A: 0.6}), *steady(4, 12, {GPU_A: 0.75})]
    taken, _ = run(frames, config)
    # gc met its target at t=3; pressure is back at t=4 but gc cools down until t=12,
    # and only then does the ladder climb again (gc missed).
    assert kinds(taken)[:3] == ["collect_garbage", "collect_garbage", "trim_kv"]
    assert [t for t, _ in taken][:3] == [2, 12, 13]


def test_hard_pressure_skips_a_step_still_cooling_down():
    cooldowns = CooldownConfig(collect_garbage=60)
    config = dataclasses.replace(NO_PERIODIC_GC, cooldown_seconds=cooldowns)
    frames = [(0, {GPU_A: 0.95}), (1, {GPU_A: 0.6}), (2, {GPU_A: 0.95})]
    taken, _ = run(frames, config)
    assert kinds(taken) == ["collect_garbage", "trim_kv"]


def test_two_gpus_are_handled_independently():
    frames = steady(0, 5, {GPU_A: 0.85, GPU_B: 0.30})
    taken, state = run(frames, NO_PERIODIC_GC)
    assert all(a.devices == (GPU_A,) for _, a in taken)
    assert state.devices[GPU_B].level is Level.NORMAL

    more, state = run(steady(5, 3, {GPU_A: 0.85, GPU_B: 0.85}), NO_PERIODIC_GC, state)
    first_b_time, first_b = next((t, a) for t, a in more if GPU_B in a.devices)
    assert first_b.kind is ActionKind.COLLECT_GARBAGE
    assert first_b.devices == (GPU_B,)
    a_same_tick = [a.kind for t, a in more if t == first_b_time and GPU_A in a.devices]
    assert a_same_tick == [ActionKind.SET_ADMISSION]  # A is far up its own ladder
    assert state.devices[GPU_B].level is Level.SOFT


def test_same_action_from_two_gpus_is_one_rpc_with_the_targets_summed():
    taken, _ = run(steady(0, 4, {GPU_A: 0.85, GPU_B: 0.80}), NO_PERIODIC_GC)
    assert kinds(taken) == ["collect_garbage", "trim_kv"]
    trim = taken[1][1]
    assert trim.devices == (GPU_A, GPU_B)
    assert trim.target_bytes == round(0.15 * TOTAL) + round(0.10 * TOTAL)


def test_the_strictest_device_decides_admission():
    frames = steady(0, 8, {GPU_A: 0.85, GPU_B: 0.30})
    frames += steady(8, 10, {GPU_A: 0.85, GPU_B: 0.85})
    taken, state = run(frames, NO_PERIODIC_GC)
    admission = [a.admission for _, a in taken if a.kind is ActionKind.SET_ADMISSION]
    assert admission == [Admission.LIMITED, Admission.PAUSED]
    assert state.admission_in_force is Admission.PAUSED


def test_failed_and_stale_readings_hold_the_level_and_take_no_action():
    entered = steady(0, 3, {GPU_A: 0.85})
    _, state = run(entered, NO_PERIODIC_GC)
    failed = [(t, {GPU_A: None}) for t in range(3, 200)]
    taken, held = run(failed, NO_PERIODIC_GC, state=state)
    assert taken == []
    assert held.devices[GPU_A] == state.devices[GPU_A]

    stale = reading(GPU_A, 5, 0.1)
    decision = decide([stale], state, NO_PERIODIC_GC, now=5 + 60)
    assert decision.actions == ()
    assert decision.state.devices[GPU_A] == state.devices[GPU_A]


def test_a_repeated_timestamp_is_not_a_fresh_sample():
    config = dataclasses.replace(NO_PERIODIC_GC, min_seconds_above_soft=0)
    state = PolicyState()
    for now in range(10):
        state = decide([reading(GPU_A, 0, 0.85)], state, config, now=now).state
    assert state.devices[GPU_A].above_soft_samples == 1
    assert state.devices[GPU_A].level is Level.NORMAL


def test_deescalation_steps_down_one_per_transition_and_reopens_admission_last():
    config = dataclasses.replace(NO_PERIODIC_GC, transition_seconds=30)
    frames = steady(0, 8, {GPU_A: 0.85}) + steady(8, 200, {GPU_A: 0.30})
    taken, state = run(frames, config)
    calm = [(t, a) for t, a in taken if t >= 8]
    assert kinds(calm) == [
        "prefetch_encoders",
        "set_admission:limited",
        "set_admission:open",
    ]
    times = [t for t, _ in calm]
    assert all(later - earlier >= 30 for earlier, later in itertools.pairwise(times))
    assert times[0] >= 8 + 2 * 30  # level drop first, then one transition per undo step
    assert state.devices[GPU_A].level is Level.NORMAL
    assert state.admission_in_force is Admission.OPEN


def test_offloaded_encoders_come_back_lazily_without_much_headroom():
    config = dataclasses.replace(NO_PERIODIC_GC, transition_seconds=10)
    frames = steady(0, 8, {GPU_A: 0.85}) + steady(8, 100, {GPU_A: 0.60})
    taken, _ = run(frames, config)
    calm = [a.kind for t, a in taken if t >= 8]
    assert ActionKind.PREFETCH_ENCODERS not in calm
    assert calm == [ActionKind.SET_ADMISSION, ActionKind.SET_ADMISSION]


def test_admission_is_reconciled_when_the_service_disagrees():
    _, state = run(steady(0, 8, {GPU_A: 0.85}), NO_PERIODIC_GC)
    assert state.admission_in_force is Admission.PAUSED
    restarted = ServiceView(admission=Admission.OPEN)
    taken, _ = run(steady(20, 2, {GPU_A: 0.85}), NO_PERIODIC_GC, state, restarted)
    reconcile = [a for _, a in taken if a.kind is ActionKind.SET_ADMISSION]
    assert [a.admission for a in reconcile] == [Admission.PAUSED]
    assert reconcile[0].rule.startswith("reconcile")


def test_periodic_gc_every_n_completed_requests():
    config = PolicyConfig(gc_every_requests=100, gc_every_seconds=0)
    state = PolicyState()
    gc_at: list[int] = []
    for t, completed in enumerate(range(0, 500, 30)):
        view = ServiceView(completed_requests=completed)
        decision = decide([reading(GPU_A, t, 0.3)], state, config, now=t, service=view)
        state = decision.state
        if decision.actions:
            assert decision.actions[0].rule == "periodic:completed_requests"
            gc_at.append(completed)
    assert gc_at == [120, 240, 360, 480]


def test_periodic_gc_every_t_seconds():
    config = PolicyConfig(gc_every_seconds=60)
    taken, _ = run(steady(0, 200, {GPU_A: 0.3}), config)
    assert [t for t, _ in taken] == [60, 120, 180]
    assert {a.rule for _, a in taken} == {"periodic:interval"}


def test_no_actions_while_the_service_cannot_be_reached():
    state = PolicyState()
    for t in range(10):
        decision = decide([reading(GPU_A, t, 0.95)], state, NO_PERIODIC_GC, now=t, can_act=False)
        assert decision.actions == ()
        state = decision.state
    assert state.devices[GPU_A].level is Level.HARD


def test_decide_is_pure():
    _, state = run(steady(0, 3, {GPU_A: 0.85}), NO_PERIODIC_GC)
    snapshot = dataclasses.replace(state, devices=dict(state.devices))
    readings = [reading(GPU_A, 3, 0.86)]
    first = decide(readings, state, NO_PERIODIC_GC, now=3)
    second = decide(readings, state, NO_PERIODIC_GC, now=3)
    assert first == second
    assert state == snapshot


def test_poll_interval_adapts_to_the_fill_rate():
    config = PolicyConfig()
    _, idle = run(steady(0, 5, {GPU_A: 0.30}), config)
    assert poll_interval(idle, config, 0.5, 5.0, 0.25) == 5.0
    _, growing = run([(float(t), {GPU_A: 0.30 + 0.01 * t}) for t in range(5)], config)
    expected = (0.92 - 0.34) / 0.01 * 0.25
    assert math.isclose(poll_interval(growing, config, 0.5, 60.0, 0.25), expected, rel_tol=1e-6)
    _, pressured = run(steady(0, 3, {GPU_A: 0.95}), config)
    assert poll_interval(pressured, config, 0.5, 5.0, 0.25) == 0.5
