"""Knative's Pod Autoscaler (KPA) as pure decisions: how many instances a revision needs.

Purely computational: no I/O, no clocks, no randomness. The caller records one concurrency
sample a second and asks for a decision every tick, passing the time each call; the same
inputs always give the same answer, so tests drive time by hand.

The model is knative/serving's ``pkg/autoscaler``. Two windows average the observed
concurrency: a stable window (60 s) for steady decisions and a short panic window (6 s) to
notice bursts. Each asks for ``ceil(concurrency / (target x utilization))`` instances. When
the panic window asks for twice the ready instances the autoscaler panics: it follows the
panic window and never scales down until a stable window passes without another burst.
Rate limits bound each step, ``scale-down-delay`` holds the recent peak, the last instance
lingers for a grace period before scale to zero, and min/max scale clamp the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.quantities import parse_duration

ANNOTATION_PREFIX = "autoscaling.knative.dev/"
DEFAULT_TARGET = 100.0
"""Knative's container-concurrency-target-default: the soft target when concurrency is
unlimited (container_concurrency 0) and no target annotation is set."""
MIN_TARGET = 0.01
"""Knative's TargetMin: keeps the division in the desired count finite."""
_PRECISION = 6
"""Decimal places kept before rounding to instances, so float noise (80 x 0.7 is
56.00000000000001) cannot add or remove an instance."""

_T = TypeVar("_T")


@dataclass(frozen=True)
class ScalingPolicy:
    """How one revision scales; defaults are Knative's and Cloud Run's."""

    container_concurrency: int = 80
    """Hard limit of requests per instance; 0 means unlimited (the target is then 100)."""
    target: float | None = None
    """Soft target of requests per instance; None means container_concurrency."""
    target_utilization: float = 0.7
    """Fraction of the target to aim for, leaving headroom while new instances start."""
    stable_window: float = 60.0
    """Seconds of history behind steady decisions and behind leaving panic mode."""
    panic_window_percentage: float = 10.0
    """Panic window as a percentage of the stable window (1..100)."""
    panic_threshold_percentage: float = 200.0
    """Panic when the panic window wants this percentage of the ready instances."""
    max_scale_up_rate: float = 1000.0
    """One decision grows to at most ceil(rate x ready) instances."""
    max_scale_down_rate: float = 2.0
    """One decision shrinks to no fewer than floor(ready / rate) instances."""
    min_scale: int = 0
    """Never fewer instances than this."""
    max_scale: int = 0
    """Never more instances than this; 0 means unlimited."""
    initial_scale: int = 1
    """Instances a new revision starts with."""
    activation_scale: int = 1
    """Fewest instances to run whenever there is any traffic (Knative's activation-scale)."""
    scale_to_zero_grace: float = 30.0
    """Seconds the last instance lingers after the stable window has drained to zero."""
    scale_down_delay: float = 0.0
    """Seconds demand must stay lower before the instance count follows it down."""


def target_per_instance(policy: ScalingPolicy) -> float:
    """Concurrency each instance should carry: the soft target (never above the hard
    limit) times the utilization, so instances keep headroom for bursts."""
    base = policy.target if policy.target is not None else _default_target(policy)
    if policy.container_concurrency > 0:
        base = min(base, policy.container_concurrency)
    return max(MIN_TARGET, base * policy.target_utilization)


def _default_target(policy: ScalingPolicy) -> float:
    """The hard limit is the natural target; unlimited instances get Knative's default."""
    if policy.container_concurrency > 0:
        return float(policy.container_concurrency)
    return DEFAULT_TARGET


def panic_window(policy: ScalingPolicy) -> float:
    """Seconds of history the panic window averages over."""
    return policy.stable_window * policy.panic_window_percentage / 100


def activation_scale(policy: ScalingPolicy) -> int:
    """Instances to start at once when a request reaches a revision at zero, without
    waiting for the next tick: a cold request should not wait two seconds more."""
    return clamp_to_scale_bounds(policy, max(1, policy.activation_scale))


def instances_for_backlog(policy: ScalingPolicy, in_flight: int, queued: int) -> int:
    """Instances wanted at once when requests queue (the activator's poke, ahead of the
    next tick): enough for everything in flight and waiting, at the per-instance target."""
    wanted = max(1, math.ceil((in_flight + queued) / target_per_instance(policy)))
    return clamp_to_scale_bounds(policy, wanted)


def starts_allowed(ready: int, starting: int, limit: int | None = None) -> int:
    """Cold starts that may begin now: a slow start, at most ``limit`` at once.

    Starting containers compete for the same few CPUs, and a cold start is mostly CPU (the
    engine's work and the app's imports), so every start in progress slows the others. At
    zero the first start goes alone: it is what the first request waits for. Then at most
    2 x ready are in progress, so capacity grows as each instance arrives (1, 3, 9, ...);
    ``limit`` caps that by what the machine can start in parallel (see
    :func:`cold_start_limit`)."""
    allowed = 2 * ready if ready else 1
    if limit is not None:
        allowed = min(allowed, limit)
    return max(0, allowed - starting)


def cold_start_limit(cpus: int) -> int:
    """Cold starts worth running at once on ``cpus`` CPUs: one per CPU, and at least two so
    that one start's waits on the engine overlap with another's work. More only makes each
    take longer, and starts begun together end together: on 2 CPUs, 12 starts of a small
    Python app ran 1.5-2.0 a second two or three at a time, the first ready after 1.1-1.5 s,
    and 1.8-1.9 a second four at a time, the first after 1.7-2.2 s (docs/benchmarks.md)."""
    return max(2, cpus)


def initial_instances(policy: ScalingPolicy) -> int:
    """Instances to start when a revision is created (Knative's initial-scale)."""
    return clamp_to_scale_bounds(policy, policy.initial_scale)


def clamp_to_scale_bounds(policy: ScalingPolicy, count: int) -> int:
    """Apply min-scale and max-scale (0 meaning unlimited). Validation keeps max-scale
    at or above min-scale; were they ever crossed, max-scale would win."""
    count = max(count, policy.min_scale)
    if policy.max_scale > 0:
        count = min(count, policy.max_scale)
    return count


# ---------------------------------------------------------------------------------------
# Annotations


@dataclass(frozen=True)
class _Range:
    """Allowed values of one annotation, and how to say them in an error message."""

    low: float
    high: float = math.inf
    low_open: bool = False
    text: str = ""

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def describe(self) -> str:
        if self.text:
            return self.text
        if self.low_open:
            return f"greater than {self.low:g}"
        if self.high == math.inf:
            return f"{self.low:g} or more"
        return f"between {self.low:g} and {self.high:g}"


_ABOVE_ZERO = _Range(0, low_open=True)
_ABOVE_ONE = _Range(1, low_open=True)
_PERCENT = _Range(1, 100)
_PANIC_THRESHOLD = _Range(110, 1000)
_NON_NEGATIVE = _Range(0)
_AT_LEAST_ONE = _Range(1)
_WINDOW = _Range(6, 3600, text="between 6s and 1h, such as 60s, 1m30s or 90")
_DELAY = _Range(0, 3600, text="between 0s and 1h, such as 30s, 5m or 90")


class _AnnotationReader:
    """Reads Knative's autoscaling annotations, kebab-case or legacy camelCase
    (``min-scale`` or ``minScale``), and names the annotation in every error."""

    def __init__(self, annotations: Mapping[str, str]) -> None:
        self._annotations = annotations

    def key(self, name: str) -> str | None:
        """The spelling of annotation ``name`` the user wrote, if any."""
        spelled = [key for key in _spellings(name) if key in self._annotations]
        values = {self._annotations[key].strip() for key in spelled}
        if len(values) > 1:
            raise InvalidError(
                f"{spelled[0]} and {spelled[1]} disagree; keep only {spelled[0]}",
                field=spelled[1],
            )
        return spelled[0] if spelled else None

    def number(self, name: str, allowed: _Range, default: _T) -> float | _T:
        key = self.key(name)
        if key is None:
            return default
        return _checked(key, self._annotations[key], _to_float, "a number", allowed)

    def fraction(self, name: str, allowed: _Range, default: float) -> float:
        """A percentage annotation as a fraction: ``70`` -> 0.7."""
        percent = self.number(name, allowed, None)
        return default if percent is None else percent / 100

    def count(self, name: str, allowed: _Range, default: int) -> int:
        key = self.key(name)
        if key is None:
            return default
        return _checked(key, self._annotations[key], int, "a whole number", allowed)

    def duration(self, name: str, allowed: _Range, default: float) -> float:
        key = self.key(name)
        if key is None:
            return default
        return float(_checked(key, self._annotations[key], _to_seconds, "a duration", allowed))


_N = TypeVar("_N", int, float)


def _checked(key: str, raw: str, parse: Callable[[str], _N], noun: str, allowed: _Range) -> _N:
    """Parse ``raw`` and check its range, or raise an error naming the annotation, what
    it accepts and the value that was wrong."""
    try:
        value = parse(raw.strip())
    except (ValueError, InvalidError):
        value = None
    if value is None or not allowed.admits(value):
        raise InvalidError(
            f"{key}: invalid value {raw!r}; use {noun} {allowed.describe()}", field=key
        )
    return value


def _to_float(raw: str) -> float:
    return float(raw)


def _to_seconds(raw: str) -> int:
    return parse_duration(raw, field="duration")


def _spellings(name: str) -> tuple[str, ...]:
    """``min-scale`` -> the annotation keys ``.../min-scale`` and ``.../minScale``."""
    head, *rest = name.split("-")
    camel = head + "".join(word.capitalize() for word in rest)
    names = (name, camel) if rest else (name,)
    return tuple(ANNOTATION_PREFIX + spelled for spelled in names)


def policy_from_annotations(
    annotations: Mapping[str, str],
    container_concurrency: int,
    defaults: ScalingPolicy = ScalingPolicy(),
) -> ScalingPolicy:
    """The revision's policy: ``defaults`` (from the server's flags) overridden by the
    revision's ``autoscaling.knative.dev/*`` annotations, each validated to Knative's
    ranges so a bad annotation is refused at deploy time, not at the first tick."""
    read = _AnnotationReader(annotations)
    policy = replace(
        defaults,
        container_concurrency=container_concurrency,
        target=read.number("target", _ABOVE_ZERO, defaults.target),
        target_utilization=read.fraction(
            "target-utilization-percentage", _PERCENT, defaults.target_utilization
        ),
        stable_window=read.duration("window", _WINDOW, defaults.stable_window),
        panic_window_percentage=read.number(
            "panic-window-percentage", _PERCENT, defaults.panic_window_percentage
        ),
        panic_threshold_percentage=read.number(
            "panic-threshold-percentage", _PANIC_THRESHOLD, defaults.panic_threshold_percentage
        ),
        max_scale_up_rate=read.number("max-scale-up-rate", _ABOVE_ONE, defaults.max_scale_up_rate),
        max_scale_down_rate=read.number(
            "max-scale-down-rate", _ABOVE_ONE, defaults.max_scale_down_rate
        ),
        min_scale=read.count("min-scale", _NON_NEGATIVE, defaults.min_scale),
        max_scale=read.count("max-scale", _NON_NEGATIVE, defaults.max_scale),
        initial_scale=read.count("initial-scale", _NON_NEGATIVE, defaults.initial_scale),
        activation_scale=read.count("activation-scale", _AT_LEAST_ONE, defaults.activation_scale),
        scale_down_delay=read.duration("scale-down-delay", _DELAY, defaults.scale_down_delay),
    )
    _check_max_not_below_min(read, policy)
    return policy


def _check_max_not_below_min(read: _AnnotationReader, policy: ScalingPolicy) -> None:
    if policy.max_scale == 0 or policy.max_scale >= policy.min_scale:
        return
    key = read.key("max-scale") or read.key("min-scale") or ANNOTATION_PREFIX + "max-scale"
    raise InvalidError(
        f"{key}: max-scale {policy.max_scale} is below min-scale {policy.min_scale}; use a "
        f"max-scale of at least {policy.min_scale}, or 0 for no limit",
        field=key,
    )


# ---------------------------------------------------------------------------------------
# Windows


class ConcurrencyWindow:
    """Average concurrency over the last ``window`` seconds, kept in buckets of
    ``granularity`` seconds, like Knative's ``aggregation.TimedFloat64Buckets``.

    As in Knative: until a full window has passed since the first sample, the average is
    over the span recorded so far, so a new revision is not judged against a window of
    zeros it never lived through. Gaps between samples count as zero. Buckets after the
    newest sample are left out rather than counted as zero, because a late sample is not
    evidence of idleness; a whole window without samples reads as 0 and starts afresh.
    Unlike Knative, samples landing in one bucket are averaged, not summed: each sample is
    already the whole revision's concurrency, where Knative records one sample per pod.
    """

    def __init__(self, window: float, granularity: float = 1.0) -> None:
        if window <= 0 or granularity <= 0:
            raise ValueError("window and granularity must be positive seconds")
        self._granularity = granularity
        self._window = window
        self._buckets: dict[int, tuple[float, int]] = {}
        self._first: int | None = None
        self._last: int | None = None

    @property
    def window(self) -> float:
        return self._window

    def record(self, now: float, value: float) -> None:
        """Add a sample: the average concurrency over the sample period ending ``now``."""
        index = self._index(now)
        if self._first is None or self._last is None or index - self._last >= self._size:
            self._restart(index)
        elif index <= self._last - self._size:
            return  # older than anything a window ending at the newest sample covers
        else:
            self._first = min(self._first, index)
            self._last = max(self._last, index)
        total, count = self._buckets.get(index, (0.0, 0))
        self._buckets[index] = (total + value, count + 1)
        self._forget_old()

    def average(self, now: float) -> float:
        """Average concurrency over the window ending ``now``."""
        if self._first is None or self._last is None:
            return 0.0
        now_index = self._index(now)
        if now_index - self._last >= self._size:
            return 0.0
        start = max(self._first, max(now_index, self._last) - self._size + 1)
        total = sum(self._bucket_average(i) for i in range(start, self._last + 1))
        return round(total / (self._last - start + 1), _PRECISION)

    def resize(self, window: float) -> None:
        """Change the window, keeping the samples the new window still covers."""
        if window <= 0:
            raise ValueError("window must be positive seconds")
        self._window = window
        self._forget_old()

    @property
    def _size(self) -> int:
        """Buckets in one window."""
        return math.ceil(round(self._window / self._granularity, _PRECISION))

    def _index(self, now: float) -> int:
        return math.floor(round(now / self._granularity, _PRECISION))

    def _restart(self, index: int) -> None:
        self._buckets.clear()
        self._first = index
        self._last = index

    def _forget_old(self) -> None:
        if self._last is None:
            return
        oldest = self._last - self._size + 1
        self._buckets = {i: b for i, b in self._buckets.items() if i >= oldest}

    def _bucket_average(self, index: int) -> float:
        total, count = self._buckets.get(index, (0.0, 0))
        return total / count if count else 0.0


# ---------------------------------------------------------------------------------------
# Decisions


@dataclass(frozen=True)
class Observation:
    """What the autoscaler sees at one tick."""

    stable_concurrency: float
    """Average concurrency over the stable window."""
    panic_concurrency: float
    """Average concurrency over the panic window."""
    ready_instances: int
    """Instances ready to serve now (starting ones do not count)."""


@dataclass(frozen=True)
class AutoscalerState:
    """What one decision hands to the next; the caller keeps it between ticks."""

    last_active: float
    """Last time any concurrency was observed, or when scaling began; scale to zero
    counts its idle time from here."""
    panic_triggered_at: float | None = None
    """Last tick the panic threshold was crossed; None when not panicking."""
    max_panic_pods: int = 0
    """Most instances wanted during this panic; panic never asks for fewer."""
    recent_desired: tuple[tuple[float, int], ...] = ()
    """(time, desired) within the scale-down delay; the decision holds their maximum."""


@dataclass(frozen=True)
class Decision:
    """The instance count to run, with the numbers behind it for logs and metrics."""

    desired: int
    panicking: bool
    stable_concurrency: float
    panic_concurrency: float
    reason: str


def initial_state(now: float, ready_instances: int = 0) -> AutoscalerState:
    """State for an autoscaler that starts at ``now``, counting the start as activity.

    As Knative does, it starts in panic mode when more than one instance is already
    running: after a daemon restart the windows are empty and would read as no traffic,
    and panic mode keeps the current instances until real history accumulates.
    """
    if ready_instances > 1:
        return AutoscalerState(now, panic_triggered_at=now, max_panic_pods=ready_instances)
    return AutoscalerState(now)


def observe_traffic(state: AutoscalerState, now: float, concurrency: float) -> AutoscalerState:
    """Note activity for the scale-to-zero clock."""
    return replace(state, last_active=now) if concurrency > 0 else state


def decide(
    policy: ScalingPolicy, state: AutoscalerState, observed: Observation, now: float
) -> tuple[Decision, AutoscalerState]:
    """How many instances to run now, and the state for the next decision."""
    target = target_per_instance(policy)
    stable_want = _instances_for(observed.stable_concurrency, target)
    panic_want = _instances_for(observed.panic_concurrency, target)
    state = _update_panic(policy, state, panic_want, observed.ready_instances, now)
    desired, state, notes = _limit(policy, state, (stable_want, panic_want), observed, now)
    panicking = state.panic_triggered_at is not None
    demand = observed.panic_concurrency if panicking else observed.stable_concurrency
    idle = now - state.last_active
    headline = _headline(desired, observed.ready_instances, demand, target, idle)
    reason = "; ".join([headline, *notes])
    stable, panic = observed.stable_concurrency, observed.panic_concurrency
    return Decision(desired, panicking, stable, panic, reason), state


def _limit(
    policy: ScalingPolicy,
    state: AutoscalerState,
    wants: tuple[int, int],
    observed: Observation,
    now: float,
) -> tuple[int, AutoscalerState, list[str]]:
    """Turn what the windows want into the count to run, in Knative's order: rate limits,
    activation scale, panic hold, scale-down delay, then the last instance's grace and
    the min/max clamp. Each step that changed the count leaves a note for the reason (the
    rate limit's only if the panic hold did not override it)."""
    ready = observed.ready_instances
    wanted = _windows_want(state, *wants)
    stable, panic = (_rate_limited(policy, want, ready) for want in wants)
    limited = _windows_want(state, stable, panic)
    bounded = _activated(policy, wanted, limited)
    held, state = _hold_in_panic(state, bounded)
    delayed, state = _delay_scale_down(policy, state, held, now)
    kept = _linger_before_zero(policy, state, delayed, ready, now)
    desired = clamp_to_scale_bounds(policy, kept)
    notes = [
        "panicking" if state.panic_triggered_at is not None else None,
        _rate_note(wanted, limited) if held == bounded else None,
        f"holding {held} until the panic ends" if held > bounded else None,
        f"scale-down delayed {policy.scale_down_delay:g}s" if delayed > held else None,
        f"keeping 1 until {_zero_after(policy):g}s idle" if kept > delayed else None,
        _clamp_note(policy, kept, desired),
    ]
    return desired, state, [note for note in notes if note]


def _instances_for(concurrency: float, target: float) -> int:
    return math.ceil(round(concurrency / target, _PRECISION))


def _windows_want(state: AutoscalerState, stable: int, panic: int) -> int:
    """In panic, provision for whichever window wants more (the stable one can, after a
    burst); otherwise the stable window decides alone."""
    return max(stable, panic) if state.panic_triggered_at is not None else stable


def _rate_limited(policy: ScalingPolicy, want: int, ready: int) -> int:
    """Keep one step within the scale-up and scale-down rates of the ready instances, so
    one noisy tick cannot wreck the fleet; zero ready counts as one so a revision at zero
    can grow."""
    base = max(1, ready)
    fewest = math.floor(round(base / policy.max_scale_down_rate, _PRECISION))
    most = math.ceil(round(base * policy.max_scale_up_rate, _PRECISION))
    return min(max(want, fewest), most)


def _activated(policy: ScalingPolicy, wanted: int, count: int) -> int:
    """Any traffic at all gets at least activation-scale instances."""
    return max(count, policy.activation_scale) if wanted > 0 else count


def _update_panic(
    policy: ScalingPolicy, state: AutoscalerState, panic_want: int, ready: int, now: float
) -> AutoscalerState:
    """Panic when the panic window wants threshold x the ready instances (zero ready
    counting as one); leave only after a stable window with no further trigger, by which
    time the burst has reached the stable average."""
    if panic_want / max(1, ready) >= policy.panic_threshold_percentage / 100:
        return replace(state, panic_triggered_at=now)
    triggered = state.panic_triggered_at
    if triggered is not None and now - triggered > policy.stable_window:
        return replace(state, panic_triggered_at=None, max_panic_pods=0)
    return state


def _hold_in_panic(state: AutoscalerState, count: int) -> tuple[int, AutoscalerState]:
    """While panicking never ask for fewer instances than earlier in this panic: a burst
    must not be answered by scaling down."""
    if state.panic_triggered_at is None:
        return count, state
    peak = max(count, state.max_panic_pods)
    return peak, replace(state, max_panic_pods=peak)


def _delay_scale_down(
    policy: ScalingPolicy, state: AutoscalerState, count: int, now: float
) -> tuple[int, AutoscalerState]:
    """Hold the largest count wanted within the scale-down delay, so demand has to stay
    low that long before instances go (Knative's scale-down-delay)."""
    if policy.scale_down_delay <= 0:
        return count, state
    kept = tuple((t, n) for t, n in state.recent_desired if now - t < policy.scale_down_delay)
    recent = (*kept, (now, count))
    return max(n for _, n in recent), replace(state, recent_desired=recent)


def _linger_before_zero(
    policy: ScalingPolicy, state: AutoscalerState, count: int, ready: int, now: float
) -> int:
    """Keep the last ready instance until traffic has been absent for the stable window
    plus the grace period, so a revision that just went quiet does not pay a cold start
    on its next request; a revision already at zero is not woken for nothing."""
    if count > 0 or ready == 0:
        return count
    return 0 if now - state.last_active >= _zero_after(policy) else 1


def _zero_after(policy: ScalingPolicy) -> float:
    return policy.stable_window + policy.scale_to_zero_grace


def _headline(desired: int, ready: int, demand: float, target: float, idle: float) -> str:
    if desired == 0:
        return f"scale to zero after {idle:.0f}s idle" if ready else "at zero: no traffic"
    verb = "scale up" if desired > ready else "scale down" if desired < ready else "steady"
    return f"{verb}: demand {demand:.1f} / target {target:.1f}"


def _rate_note(wanted: int, allowed: int) -> str | None:
    if allowed < wanted:
        return "limited by max-scale-up-rate"
    if allowed > wanted:
        return "limited by max-scale-down-rate"
    return None


def _clamp_note(policy: ScalingPolicy, count: int, clamped: int) -> str | None:
    if clamped > count:
        return f"raised to min-scale {policy.min_scale}"
    if clamped < count:
        return f"capped at max-scale {policy.max_scale}"
    return None


# ---------------------------------------------------------------------------------------
# One revision's autoscaler


class Scaler:
    """One revision's autoscaler: both windows and the state between decisions.

    The reconcile loop keeps one per revision, records the revision's concurrency every
    second (in-flight plus queued requests, zero included) and asks for a decision every
    tick. All logic lives in :func:`decide`; this class only carries its inputs.
    """

    def __init__(self, policy: ScalingPolicy, now: float, ready_instances: int = 0) -> None:
        self._policy = policy
        self._stable = ConcurrencyWindow(policy.stable_window)
        self._panic = ConcurrencyWindow(panic_window(policy))
        self._state = initial_state(now, ready_instances)

    @property
    def policy(self) -> ScalingPolicy:
        return self._policy

    @property
    def state(self) -> AutoscalerState:
        return self._state

    def update_policy(self, policy: ScalingPolicy) -> None:
        """Adopt a changed policy, keeping the history the new windows still cover."""
        self._policy = policy
        self._stable.resize(policy.stable_window)
        self._panic.resize(panic_window(policy))

    def record(self, now: float, concurrency: float) -> None:
        """Add one sample: the average concurrency over the period ending ``now``."""
        self._stable.record(now, concurrency)
        self._panic.record(now, concurrency)
        self._state = observe_traffic(self._state, now, concurrency)

    def observe(self, now: float, ready_instances: int) -> Observation:
        return Observation(self._stable.average(now), self._panic.average(now), ready_instances)

    def decide(self, now: float, ready_instances: int) -> Decision:
        """The decision for this tick; the state moves on with it."""
        observed = self.observe(now, ready_instances)
        decision, self._state = decide(self._policy, self._state, observed, now)
        return decision
