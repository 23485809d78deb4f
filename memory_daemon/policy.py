"""The memory policy: a pure function from readings, history and config to actions.

Per device: a level (normal / soft / hard) with separate enter and exit marks, entered
after sustained pressure (soft), at once (hard) or early on fast growth (trend). While a
device is above its soft exit mark it climbs the escalation ladder one step per tick,
re-measuring in between; it climbs further only when the previous step missed the
reclaim target (the soft exit mark). Back below the exit mark for a transition period,
levels step down one at a time, then restrictions are undone, admission last.

The escalation ladder, cheapest first, is `LADDER`.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from memory_daemon.config import PolicyConfig
from memory_daemon.readings import DeviceReading
from memory_daemon.trend import least_squares_slope, peak_rate, seconds_until


class Level(IntEnum):
    NORMAL = 0
    SOFT = 1
    HARD = 2


class Admission(IntEnum):
    """Admission restriction; higher is stricter."""

    OPEN = 0
    LIMITED = 1
    PAUSED = 2


class Step(IntEnum):
    """Rungs of the escalation ladder, cheapest first."""

    COLLECT_GARBAGE = 0
    TRIM_KV = 1
    OFFLOAD_ENCODERS = 2
    LIMIT_ADMISSION = 3
    PAUSE_ADMISSION = 4


LADDER = tuple(Step)
_STEP_ADMISSION = {Step.LIMIT_ADMISSION: Admission.LIMITED, Step.PAUSE_ADMISSION: Admission.PAUSED}


class ActionKind(StrEnum):
    COLLECT_GARBAGE = "collect_garbage"
    TRIM_KV = "trim_kv"
    OFFLOAD_ENCODERS = "offload_encoders"
    SET_ADMISSION = "set_admission"
    PREFETCH_ENCODERS = "prefetch_encoders"


_STEP_KIND = {
    Step.COLLECT_GARBAGE: ActionKind.COLLECT_GARBAGE,
    Step.TRIM_KV: ActionKind.TRIM_KV,
    Step.OFFLOAD_ENCODERS: ActionKind.OFFLOAD_ENCODERS,
}


@dataclass(frozen=True, slots=True)
class Action:
    """One thing to ask of the service; `devices` are the devices that asked for it."""

    kind: ActionKind
    rule: str
    devices: tuple[str, ...] = ()
    target_bytes: int = 0
    admission: Admission = Admission.OPEN
    admission_limit: int = 0


@dataclass(frozen=True, slots=True)
class ServiceView:
    """What the policy needs from the service's MemoryStatus."""

    completed_requests: int = 0
    admission: Admission = Admission.OPEN
    admission_limit: int = 0


@dataclass(frozen=True, slots=True)
class DeviceState:
    level: Level = Level.NORMAL
    samples: tuple[tuple[float, float], ...] = ()
    last_timestamp: float | None = None
    used_fraction: float = 0.0
    above_soft_since: float | None = None
    above_soft_samples: int = 0
    calm_since: float | None = None
    next_step: Step = Step.COLLECT_GARBAGE
    pending_step: Step | None = None
    last_step_at: dict[Step, float] = field(default_factory=dict)
    admission: Admission = Admission.OPEN
    encoders_offloaded: bool = False
    last_deescalation_at: float | None = None
    seconds_to_hard: float = math.inf
    total_bytes: int = 0
    entered_by: str = ""


@dataclass(frozen=True, slots=True)
class PolicyState:
    devices: dict[str, DeviceState] = field(default_factory=dict)
    admission_in_force: Admission = Admission.OPEN
    last_admission_change_at: float | None = None
    last_gc_at: float | None = None
    completed_at_last_gc: int | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    actions: tuple[Action, ...]
    state: PolicyState


@dataclass(frozen=True, slots=True)
class _Intent:
    """What one device wants this tick."""

    kind: ActionKind
    rule: str
    target_bytes: int = 0


def decide(
    readings: list[DeviceReading],
    state: PolicyState,
    config: PolicyConfig,
    now: float,
    service: ServiceView | None = None,
    can_act: bool = True,
) -> Decision:
    """One tick of the policy. Pure: the same inputs always give the same decision."""
    devices = dict(state.devices)
    intents: dict[str, _Intent] = {}
    for reading in readings:
        previous = devices.get(reading.device, DeviceState())
        updated, intent = _device_tick(reading, previous, config, now, can_act)
        devices[reading.device] = updated
        if intent is not None:
            intents[reading.device] = intent
    state = dataclasses.replace(state, devices=devices)
    if state.last_gc_at is None:
        state = dataclasses.replace(state, last_gc_at=now)
    if not can_act:
        return Decision((), state)
    actions = _merge_intents(intents)
    admission_action, state = _admission_action(state, config, now, service)
    if admission_action is not None:
        actions.append(admission_action)
    if not actions:
        periodic = _periodic_gc(state, config, now, service)
        if periodic is not None:
            actions.append(periodic)
    if any(action.kind is ActionKind.COLLECT_GARBAGE for action in actions):
        completed = service.completed_requests if service else state.completed_at_last_gc
        state = dataclasses.replace(state, last_gc_at=now, completed_at_last_gc=completed)
    return Decision(tuple(actions), state)


def _device_tick(
    reading: DeviceReading,
    device: DeviceState,
    config: PolicyConfig,
    now: float,
    can_act: bool,
) -> tuple[DeviceState, _Intent | None]:
    fresh = (
        reading.ok
        and reading.total_bytes > 0
        and now - reading.timestamp <= config.stale_after_seconds
        and (device.last_timestamp is None or reading.timestamp > device.last_timestamp)
    )
    if not fresh:
        return device, None
    device = _observe(reading, device, config)
    device = _update_level(reading, device, config)
    if not can_act:
        return device, None
    if device.level is not Level.NORMAL and device.used_fraction > config.soft_exit:
        return _escalate(reading, device, config, now)
    if device.level is Level.NORMAL:
        return _deescalate(reading, device, config)
    return device, None


def _observe(reading: DeviceReading, device: DeviceState, config: PolicyConfig) -> DeviceState:
    """Record a fresh sample: history, sustained-pressure counters, verdict on the last step."""
    t = reading.timestamp
    fraction = reading.used_fraction
    samples = (
        *tuple(s for s in device.samples if s[0] >= t - config.trend_window_seconds),
        (t, float(reading.total_bytes - reading.free_bytes)),
    )
    if fraction >= config.soft_enter:
        above_since = device.above_soft_since if device.above_soft_since is not None else t
        above_samples = device.above_soft_samples + 1
    else:
        above_since, above_samples = None, 0
    next_step, pending = device.next_step, device.pending_step
    if pending is not None:
        missed = fraction > config.soft_exit
        next_step = Step((pending + 1) % len(LADDER)) if missed else Step.COLLECT_GARBAGE
        pending = None
    return dataclasses.replace(
        device,
        samples=samples,
        last_timestamp=t,
        used_fraction=fraction,
        total_bytes=reading.total_bytes,
        above_soft_since=above_since,
        above_soft_samples=above_samples,
        next_step=next_step,
        pending_step=pending,
        seconds_to_hard=_seconds_to_mark(reading, config, samples, config.hard_enter),
    )


def _seconds_to_mark(
    reading: DeviceReading,
    config: PolicyConfig,
    samples: tuple[tuple[float, float], ...],
    mark: float,
) -> float:
    if len(samples) < config.trend_min_samples:
        return math.inf
    used = reading.total_bytes - reading.free_bytes
    return seconds_until(used, mark * reading.total_bytes, least_squares_slope(samples))


def _falling_fast(reading: DeviceReading, device: DeviceState, config: PolicyConfig) -> bool:
    """Usage will drop below the soft exit mark within the trend horizon on its own."""
    if len(device.samples) < config.trend_min_samples:
        return False
    slope = least_squares_slope(device.samples)
    if slope >= 0:
        return False
    above_exit = reading.total_bytes - reading.free_bytes - config.soft_exit * reading.total_bytes
    return above_exit / -slope <= config.trend_horizon_seconds


def _update_level(reading: DeviceReading, device: DeviceState, config: PolicyConfig) -> DeviceState:
    t = reading.timestamp
    fraction = device.used_fraction
    level = device.level
    if fraction >= config.hard_enter and level is not Level.HARD:
        return dataclasses.replace(
            device, level=Level.HARD, calm_since=None, entered_by="hard_mark"
        )
    if level is Level.NORMAL:
        if _sustained(device, config, t):
            return dataclasses.replace(
                device, level=Level.SOFT, calm_since=None, entered_by="soft_sustained"
            )
        if fraction >= config.soft_exit and device.seconds_to_hard <= config.trend_horizon_seconds:
            return dataclasses.replace(
                device, level=Level.SOFT, calm_since=None, entered_by="trend"
            )
        calm = fraction < config.soft_exit
        calm_since = (device.calm_since if device.calm_since is not None else t) if calm else None
        return dataclasses.replace(device, calm_since=calm_since)
    exit_mark = config.hard_exit if level is Level.HARD else config.soft_exit
    if fraction >= exit_mark:
        return dataclasses.replace(device, calm_since=None)
    calm_since = device.calm_since if device.calm_since is not None else t
    if t - calm_since < config.transition_seconds:
        return dataclasses.replace(device, calm_since=calm_since)
    if level is Level.SOFT:
        return dataclasses.replace(
            device,
            level=Level.NORMAL,
            calm_since=t,
            last_deescalation_at=t,
            next_step=Step.COLLECT_GARBAGE,
            pending_step=None,
        )
    still_calm = fraction < config.soft_exit
    return dataclasses.replace(device, level=Level.SOFT, calm_since=t if still_calm else None)


def _sustained(device: DeviceState, config: PolicyConfig, t: float) -> bool:
    return (
        device.above_soft_since is not None
        and device.above_soft_samples >= max(1, config.min_samples_above_soft)
        and t - device.above_soft_since >= config.min_seconds_above_soft
    )


def _cooldown(config: PolicyConfig, step: Step) -> float:
    return float(getattr(config.cooldown_seconds, step.name.lower()))


def _escalate(
    reading: DeviceReading, device: DeviceState, config: PolicyConfig, now: float
) -> tuple[DeviceState, _Intent | None]:
    if device.level is Level.SOFT and _falling_fast(reading, device, config):
        return device, None
    for offset in range(len(LADDER)):
        step = Step((device.next_step + offset) % len(LADDER))
        admission = _STEP_ADMISSION.get(step)
        if admission is not None and device.admission >= admission:
            continue
        last = device.last_step_at.get(step)
        if last is not None and now - last < _cooldown(config, step):
            if device.level is Level.HARD:
                continue
            return device, None
        return _take_step(reading, device, config, now, step)
    return device, None


def _take_step(
    reading: DeviceReading, device: DeviceState, config: PolicyConfig, now: float, step: Step
) -> tuple[DeviceState, _Intent | None]:
    used = reading.total_bytes - reading.free_bytes
    target = max(config.min_reclaim_bytes, math.ceil(used - config.soft_exit * reading.total_bytes))
    device = dataclasses.replace(
        device,
        samples=(),  # the step changes usage: trends restart from the next reading
        pending_step=step,
        last_step_at={**device.last_step_at, step: now},
        admission=_STEP_ADMISSION.get(step, device.admission),
        encoders_offloaded=device.encoders_offloaded or step is Step.OFFLOAD_ENCODERS,
    )
    kind = _STEP_KIND.get(step, ActionKind.SET_ADMISSION)
    return device, _Intent(
        kind=kind, rule=f"{device.entered_by}:{step.name.lower()}", target_bytes=target
    )


def _deescalate(
    reading: DeviceReading, device: DeviceState, config: PolicyConfig
) -> tuple[DeviceState, _Intent | None]:
    """Undo one restriction per transition period; admission reopens last."""
    t = reading.timestamp
    if device.calm_since is None or device.used_fraction >= config.soft_exit:
        return device, None
    since = max(device.calm_since, device.last_deescalation_at or device.calm_since)
    if t - since < config.transition_seconds:
        return device, None
    if device.encoders_offloaded:
        free_fraction = reading.free_bytes / reading.total_bytes
        device = dataclasses.replace(device, encoders_offloaded=False)
        prefetch = (
            config.prefetch_free_fraction > 0 and free_fraction >= config.prefetch_free_fraction
        )
        if prefetch:
            device = dataclasses.replace(device, last_deescalation_at=t)
            return device, _Intent(ActionKind.PREFETCH_ENCODERS, "deescalate:prefetch_encoders")
    if device.admission > Admission.OPEN:
        lower = Admission(device.admission - 1)
        device = dataclasses.replace(device, admission=lower, last_deescalation_at=t)
        return device, _Intent(
            ActionKind.SET_ADMISSION, f"deescalate:admission_{lower.name.lower()}"
        )
    return device, None


def _merge_intents(intents: dict[str, _Intent]) -> list[Action]:
    """One RPC per action kind per tick; admission is derived from all devices afterwards."""
    merged: dict[ActionKind, Action] = {}
    for device, intent in sorted(intents.items()):
        if intent.kind is ActionKind.SET_ADMISSION:
            continue
        existing = merged.get(intent.kind)
        if existing is None:
            merged[intent.kind] = Action(intent.kind, intent.rule, (device,), intent.target_bytes)
        else:
            merged[intent.kind] = dataclasses.replace(
                existing,
                devices=(*existing.devices, device),
                target_bytes=existing.target_bytes + intent.target_bytes,
            )
    return list(merged.values())


def _admission_action(
    state: PolicyState, config: PolicyConfig, now: float, service: ServiceView | None
) -> tuple[Action | None, PolicyState]:
    """The strictest admission any device asks for is the one in force."""
    wanted = max((d.admission for d in state.devices.values()), default=Admission.OPEN)
    limit = config.admission_limit if wanted is Admission.LIMITED else 0
    askers = tuple(sorted(k for k, d in state.devices.items() if d.admission == wanted))
    if wanted != state.admission_in_force:
        rule = "escalate" if wanted > state.admission_in_force else "deescalate"
    elif service is not None and _differs(service, wanted, limit):
        last = state.last_admission_change_at
        if last is not None and now - last < config.cooldown_seconds.set_admission:
            return None, state
        rule = "reconcile"
    else:
        return None, state
    action = Action(
        ActionKind.SET_ADMISSION,
        f"{rule}:admission_{wanted.name.lower()}",
        askers,
        admission=wanted,
        admission_limit=limit,
    )
    state = dataclasses.replace(state, admission_in_force=wanted, last_admission_change_at=now)
    return action, state


def _differs(service: ServiceView, wanted: Admission, limit: int) -> bool:
    if service.admission != wanted:
        return True
    return wanted is Admission.LIMITED and service.admission_limit != limit


def _periodic_gc(
    state: PolicyState, config: PolicyConfig, now: float, service: ServiceView | None
) -> Action | None:
    if service is not None and config.gc_every_requests > 0:
        baseline = state.completed_at_last_gc
        if baseline is None or service.completed_requests < baseline:
            baseline = 0
        if service.completed_requests - baseline >= config.gc_every_requests:
            return Action(ActionKind.COLLECT_GARBAGE, "periodic:completed_requests")
    last = state.last_gc_at
    if config.gc_every_seconds > 0 and last is not None and now - last >= config.gc_every_seconds:
        return Action(ActionKind.COLLECT_GARBAGE, "periodic:interval")
    return None


def poll_interval(
    state: PolicyState,
    config: PolicyConfig,
    min_seconds: float,
    max_seconds: float,
    safety_factor: float,
) -> float:
    """Poll faster the sooner a device could fill: headroom / peak fill rate, clamped."""
    if any(device.level is not Level.NORMAL for device in state.devices.values()):
        return min_seconds
    soonest = math.inf
    for device in state.devices.values():
        if len(device.samples) < 2:
            continue
        used = device.samples[-1][1]
        limit = config.hard_enter * device.total_bytes
        soonest = min(soonest, seconds_until(used, limit, peak_rate(device.samples)))
    return min(max_seconds, max(min_seconds, soonest * safety_factor))
