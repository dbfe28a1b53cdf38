"""Knative's KPA as pure decisions: tables of samples, ready instances and times in,
instance counts out, in the style of knative/serving's autoscaler_test.go. Time is a
plain number the tests choose; nothing sleeps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import pytest

from cloudlet.domain.autoscale import (
    AutoscalerState,
    ConcurrencyWindow,
    Decision,
    Observation,
    Scaler,
    ScalingPolicy,
    activation_scale,
    decide,
    initial_instances,
    initial_state,
    policy_from_annotations,
    target_per_instance,
)
from cloudlet.domain.errors import InvalidError

# containerConcurrency 10 at 70% utilization: each instance should carry 7 requests.
POLICY = ScalingPolicy(container_concurrency=10)
KEY = "autoscaling.knative.dev/"

Samples = Iterable[tuple[float, float]]


def steady(concurrency: float, start: int, stop: int) -> list[tuple[float, float]]:
    """One sample a second over [start, stop), as the router reports them."""
    return [(float(t), concurrency) for t in range(start, stop)]


def decide_after(policy: ScalingPolicy, samples: Samples, ready: int, now: float) -> Decision:
    """The first decision of a scaler created at t=0 that has seen ``samples``."""
    scaler = Scaler(policy, now=0.0)
    for t, concurrency in samples:
        scaler.record(t, concurrency)
    return scaler.decide(now, ready)


def simulate(
    scaler: Scaler, load: Callable[[int], float], until: int, ready: int
) -> dict[int, Decision]:
    """Drive a scaler as the reconcile loop does: a sample every second, a decision every
    two, and every desired instance ready by the next tick."""
    decisions: dict[int, Decision] = {}
    for t in range(1, until + 1):
        scaler.record(t, load(t))
        if t % 2 == 0:
            decisions[t] = scaler.decide(t, ready)
            ready = decisions[t].desired
    return decisions


# ---------------------------------------------------------------------------------------
# Steady decisions from the stable window


@dataclass(frozen=True)
class StableCase:
    name: str
    samples: list[tuple[float, float]]
    ready: int
    want: int
    policy: ScalingPolicy = POLICY
    now: float = 60.0


STABLE_CASES = [
    StableCase("steady traffic keeps the instance count", steady(35, 0, 60), ready=5, want=5),
    StableCase("more demand scales up", steady(35, 0, 60), ready=3, want=5),
    StableCase("less demand scales down", steady(7, 0, 60), ready=2, want=1),
    StableCase("fractional demand rounds up", steady(7.1, 0, 60), ready=2, want=2),
    StableCase("a revision at zero stays there without traffic", steady(0, 0, 60), 0, 0),
    StableCase(
        "unlimited concurrency targets 100 per instance",
        steady(140, 0, 60),
        ready=2,
        want=2,
        policy=ScalingPolicy(container_concurrency=0),
    ),
    StableCase(
        "the target annotation sets the soft target",
        steady(35, 0, 60),
        ready=4,
        want=4,
        policy=ScalingPolicy(container_concurrency=80, target=10, target_utilization=1.0),
    ),
    StableCase(
        "a target above the hard limit is capped at the limit",
        steady(35, 0, 60),
        ready=5,
        want=5,
        policy=replace(POLICY, target=50),
    ),
    StableCase(
        "lower utilization keeps more headroom",
        steady(35, 0, 60),
        ready=7,
        want=7,
        policy=replace(POLICY, target_utilization=0.5),
    ),
    StableCase(
        "a short spike counts for its share of the window",
        [*steady(7, 0, 50), *steady(35, 50, 53), *steady(7, 53, 60)],
        ready=1,
        want=2,
    ),
]


@pytest.mark.parametrize("case", STABLE_CASES, ids=lambda case: case.name)
def test_stable_window_demand_sets_the_instance_count(case: StableCase) -> None:
    decision = decide_after(case.policy, case.samples, case.ready, case.now)
    assert (decision.desired, decision.panicking) == (case.want, False)


def test_decision_reports_demand_and_target_in_its_reason() -> None:
    decision = decide_after(POLICY, steady(35, 0, 60), ready=3, now=60)
    assert decision.reason == "scale up: demand 35.0 / target 7.0"
    assert (decision.stable_concurrency, decision.panic_concurrency) == (35.0, 35.0)


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        (ScalingPolicy(), 56.0),
        (ScalingPolicy(container_concurrency=0), 70.0),
        (ScalingPolicy(container_concurrency=1), 0.7),
        (ScalingPolicy(container_concurrency=80, target=20), 14.0),
        (ScalingPolicy(container_concurrency=0, target=300, target_utilization=1.0), 300.0),
        (ScalingPolicy(container_concurrency=10, target=50, target_utilization=0.5), 5.0),
        (ScalingPolicy(container_concurrency=0, target=0.001), 0.01),
    ],
)
def test_target_per_instance_is_the_soft_target_times_utilization(
    policy: ScalingPolicy, want: float
) -> None:
    assert target_per_instance(policy) == pytest.approx(want)


# ---------------------------------------------------------------------------------------
# Panic mode


@dataclass(frozen=True)
class PanicCase:
    name: str
    stable: float
    panic: float
    ready: int
    want: int
    panicking: bool
    policy: ScalingPolicy = POLICY


PANIC_CASES = [
    PanicCase("panic window at twice the ready capacity panics", 7, 28, 2, 4, True),
    PanicCase("panic window below twice the ready capacity does not", 7, 21, 2, 1, False),
    PanicCase("zero ready instances count as one", 0, 14, 0, 2, True),
    PanicCase("panic provisions for the stable window when it wants more", 70, 28, 2, 10, True),
    PanicCase(
        "a higher panic threshold needs a bigger burst",
        7,
        28,
        2,
        1,
        False,
        replace(POLICY, panic_threshold_percentage=300),
    ),
]


@pytest.mark.parametrize("case", PANIC_CASES, ids=lambda case: case.name)
def test_panic_starts_when_the_panic_window_outgrows_ready_capacity(case: PanicCase) -> None:
    observed = Observation(case.stable, case.panic, case.ready)
    decision, state = decide(case.policy, AutoscalerState(last_active=0), observed, now=10)
    assert (decision.desired, decision.panicking) == (case.want, case.panicking)
    assert state.panic_triggered_at == (10 if case.panicking else None)


def test_panicking_revision_never_scales_down() -> None:
    state = AutoscalerState(last_active=0, panic_triggered_at=0, max_panic_pods=10)
    decision, after = decide(POLICY, state, Observation(7, 7, ready_instances=10), now=30)
    assert (decision.desired, decision.panicking) == (10, True)
    assert (
        decision.reason
        == "steady: demand 7.0 / target 7.0; panicking; holding 10 until the panic ends"
    )
    assert after.max_panic_pods == 10


@pytest.mark.parametrize(
    ("now", "want", "panicking"),
    [(30, 10, True), (60, 10, True), (60.5, 5, False), (62, 5, False)],
)
def test_panic_ends_after_a_stable_window_without_a_new_burst(
    now: float, want: int, panicking: bool
) -> None:
    state = AutoscalerState(last_active=0, panic_triggered_at=0, max_panic_pods=10)
    decision, after = decide(POLICY, state, Observation(7, 7, ready_instances=10), now)
    assert (decision.desired, decision.panicking) == (want, panicking)
    assert after.max_panic_pods == (10 if panicking else 0)


def test_a_new_burst_during_panic_extends_it() -> None:
    state = AutoscalerState(last_active=0, panic_triggered_at=0, max_panic_pods=2)
    _, state = decide(POLICY, state, Observation(7, 28, ready_instances=2), now=50)
    decision, state = decide(POLICY, state, Observation(7, 7, ready_instances=4), now=100)
    assert (decision.desired, decision.panicking) == (4, True)
    assert state.panic_triggered_at == 50


def test_burst_panics_then_settles_a_stable_window_after_it_peaked() -> None:
    def load(t: int) -> float:
        return 70.0 if 60 < t <= 100 else 7.0

    decisions = simulate(Scaler(POLICY, now=0.0), load, until=130, ready=1)
    timeline = {t: (decisions[t].desired, decisions[t].panicking) for t in (60, 62, 64, 66)}
    assert timeline == {60: (1, False), 62: (4, True), 64: (7, True), 66: (10, True)}
    assert (decisions[122].desired, decisions[122].panicking) == (10, True)
    assert (decisions[124].desired, decisions[124].panicking) == (7, False)


def test_restarted_autoscaler_keeps_running_instances_until_history_accumulates() -> None:
    scaler = Scaler(POLICY, now=0.0, ready_instances=4)
    decisions = simulate(scaler, lambda t: 0.0, until=62, ready=4)
    assert (decisions[2].desired, decisions[2].panicking) == (4, True)
    assert (decisions[60].desired, decisions[60].panicking) == (4, True)
    assert (decisions[62].desired, decisions[62].panicking) == (2, False)


# ---------------------------------------------------------------------------------------
# Rate limits


@pytest.mark.parametrize(
    ("policy", "ready", "want"),
    [
        (POLICY, 10, 5),
        (POLICY, 3, 1),
        (replace(POLICY, max_scale_down_rate=4), 10, 2),
        (replace(POLICY, max_scale_down_rate=1.5), 10, 6),
    ],
)
def test_scale_down_is_limited_by_max_scale_down_rate(
    policy: ScalingPolicy, ready: int, want: int
) -> None:
    decision, _ = decide(policy, AutoscalerState(last_active=0), Observation(7, 7, ready), 10)
    assert decision.desired == want


def test_rate_limited_scale_down_says_so() -> None:
    decision, _ = decide(POLICY, AutoscalerState(last_active=0), Observation(7, 7, 10), 10)
    assert decision.reason == "scale down: demand 7.0 / target 7.0; limited by max-scale-down-rate"


@pytest.mark.parametrize(
    ("rate", "ready", "want"),
    [(2.0, 2, 4), (1.1, 3, 4), (1.1, 10, 11), (1000.0, 2, 100), (2.0, 0, 2)],
)
def test_scale_up_is_limited_by_max_scale_up_rate(rate: float, ready: int, want: int) -> None:
    # Stable demand wants 100 instances; the panic window is kept calm to isolate the rate.
    policy = replace(POLICY, max_scale_up_rate=rate)
    observed = Observation(700, min(7.0, 7.0 * ready), ready)
    decision, _ = decide(policy, AutoscalerState(last_active=0), observed, now=10)
    assert (decision.desired, decision.panicking) == (want, False)


# ---------------------------------------------------------------------------------------
# Scale to zero


@pytest.mark.parametrize(
    ("now", "want"),
    [(60, 1), (70, 1), (98, 1), (99, 0), (120, 0)],
)
def test_idle_revision_scales_to_zero_after_grace(now: float, want: int) -> None:
    # Traffic stops after t=9: the stable window drains by t=70, the grace ends at t=99.
    samples = [*steady(7, 0, 10), *steady(0, 10, int(now) + 1)]
    assert decide_after(POLICY, samples, ready=1, now=now).desired == want


def test_scale_to_zero_explains_itself() -> None:
    lingering = decide_after(POLICY, [*steady(7, 0, 10), *steady(0, 10, 71)], 1, now=70)
    assert lingering.reason == "steady: demand 0.0 / target 7.0; keeping 1 until 90s idle"
    gone = decide_after(POLICY, [*steady(7, 0, 10), *steady(0, 10, 100)], 1, now=99)
    assert gone.reason == "scale to zero after 90s idle"


@pytest.mark.parametrize(("now", "want"), [(89, 1), (90, 0)])
def test_new_revision_without_traffic_scales_to_zero_after_window_and_grace(
    now: float, want: int
) -> None:
    assert decide_after(POLICY, steady(0, 0, int(now) + 1), ready=1, now=now).desired == want


def test_short_window_and_grace_scale_to_zero_sooner() -> None:
    policy = replace(POLICY, stable_window=6, scale_to_zero_grace=2)
    decisions = [
        decide_after(policy, [*steady(7, 0, 3), *steady(0, 3, now + 1)], 1, now).desired
        for now in (9, 10, 11)
    ]
    assert decisions == [1, 0, 0]


def test_revision_at_zero_is_not_woken_without_traffic() -> None:
    decision = decide_after(POLICY, steady(0, 0, 30), ready=0, now=30)
    assert (decision.desired, decision.reason) == (0, "at zero: no traffic")


def test_any_traffic_at_zero_asks_for_an_instance() -> None:
    assert decide_after(POLICY, [(0, 0.5)], ready=0, now=0).desired == 1


# ---------------------------------------------------------------------------------------
# Bounds, activation and delay


@pytest.mark.parametrize(
    ("policy", "concurrency", "ready", "want", "note"),
    [
        (replace(POLICY, min_scale=2), 0, 0, 2, "raised to min-scale 2"),
        (replace(POLICY, min_scale=2), 7, 2, 2, "raised to min-scale 2"),
        (replace(POLICY, max_scale=5), 700, 5, 5, "capped at max-scale 5"),
        (replace(POLICY, max_scale=0), 700, 100, 100, ""),
    ],
)
def test_min_and_max_scale_clamp_the_decision(
    policy: ScalingPolicy, concurrency: float, ready: int, want: int, note: str
) -> None:
    decision = decide_after(policy, steady(concurrency, 0, 60), ready, now=60)
    assert decision.desired == want
    assert note in decision.reason


def test_min_scale_outlasts_the_idle_grace() -> None:
    policy = replace(POLICY, min_scale=2)
    assert decide_after(policy, steady(0, 0, 200), ready=2, now=200).desired == 2


def test_any_traffic_gets_at_least_the_activation_scale() -> None:
    policy = replace(POLICY, activation_scale=3)
    assert decide_after(policy, steady(1, 0, 60), ready=0, now=60).desired == 3
    assert decide_after(policy, steady(0, 0, 60), ready=0, now=60).desired == 0


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        (ScalingPolicy(), 1),
        (ScalingPolicy(min_scale=3), 3),
        (ScalingPolicy(activation_scale=4), 4),
        (ScalingPolicy(activation_scale=4, max_scale=2), 2),
    ],
)
def test_activation_scale_is_what_a_request_at_zero_starts(
    policy: ScalingPolicy, want: int
) -> None:
    assert activation_scale(policy) == want


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        (ScalingPolicy(), 1),
        (ScalingPolicy(initial_scale=0), 0),
        (ScalingPolicy(initial_scale=3, min_scale=5), 5),
        (ScalingPolicy(initial_scale=9, max_scale=4), 4),
    ],
)
def test_initial_instances_follow_initial_scale_within_bounds(
    policy: ScalingPolicy, want: int
) -> None:
    assert initial_instances(policy) == want


@pytest.mark.parametrize(
    ("now", "want"),
    [(0, 5), (2, 5), (8, 5), (10, 1), (12, 1)],
)
def test_scale_down_delay_holds_the_peak_for_the_delay(now: float, want: int) -> None:
    policy = replace(POLICY, scale_down_delay=10, max_scale_down_rate=1000)
    state = AutoscalerState(last_active=0)
    decision = None
    for t in range(0, int(now) + 1, 2):
        stable = 35.0 if t == 0 else 7.0
        decision, state = decide(policy, state, Observation(stable, stable, 5), t)
    assert decision is not None
    assert decision.desired == want


def test_delayed_scale_down_says_so() -> None:
    policy = replace(POLICY, scale_down_delay=10, max_scale_down_rate=1000)
    _, state = decide(policy, AutoscalerState(last_active=0), Observation(35, 35, 5), 0)
    decision, _ = decide(policy, state, Observation(7, 7, 5), 2)
    assert decision.reason == "steady: demand 7.0 / target 7.0; scale-down delayed 10s"


# ---------------------------------------------------------------------------------------
# Window averaging


@dataclass(frozen=True)
class WindowCase:
    name: str
    samples: list[tuple[float, float]]
    now: float
    want: float
    window: float = 60.0
    granularity: float = 1.0


WINDOW_CASES = [
    WindowCase("a young window averages over the span recorded", steady(6, 0, 6), 5, 6.0),
    WindowCase("gaps between samples count as zero", [(0, 10), (2, 10)], 2, 20 / 3),
    WindowCase(
        "a full window averages the whole window",
        [*steady(10, 0, 60), *steady(0, 60, 90)],
        89,
        5.0,
    ),
    WindowCase("buckets after the newest sample are left out", steady(10, 0, 10), 15, 10.0),
    WindowCase("a window without samples reads zero", [(0, 10)], 60, 0.0),
    WindowCase("the last sample counts until a window passes", [(0, 10)], 59, 10.0),
    WindowCase("samples in one bucket are averaged", [(0.2, 4), (0.7, 8)], 0.9, 6.0),
    WindowCase("a sample after a silent window starts afresh", [(0, 10), (100, 2)], 100, 2.0),
    WindowCase("samples older than a window are ignored", [(100, 2), (30, 50)], 100, 2.0),
    WindowCase("coarse buckets span granularity", [(0, 4), (1, 8), (2, 3)], 3, 4.5, 10, 2),
    WindowCase("a sub-bucket window keeps one bucket", [(0, 1), (1, 5)], 1, 5.0, 0.6),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda case: case.name)
def test_window_average_follows_knatives_bucketing(case: WindowCase) -> None:
    window = ConcurrencyWindow(case.window, case.granularity)
    for t, value in case.samples:
        window.record(t, value)
    assert window.average(case.now) == pytest.approx(case.want)


def test_empty_window_reads_zero() -> None:
    assert ConcurrencyWindow(60).average(100) == 0.0


def test_shrinking_a_window_keeps_only_what_it_still_covers() -> None:
    window = ConcurrencyWindow(60)
    for t, value in [*steady(10, 0, 50), *steady(0, 50, 60)]:
        window.record(t, value)
    window.resize(10)
    assert (window.window, window.average(59)) == (10, 0.0)


def test_scaler_adopts_a_new_policy_and_its_windows() -> None:
    scaler = Scaler(POLICY, now=0.0)
    for t, value in [*steady(35, 0, 50), *steady(7, 50, 60)]:
        scaler.record(t, value)
    scaler.update_policy(replace(POLICY, stable_window=10))
    assert scaler.observe(59, ready_instances=5) == Observation(7.0, 7.0, 5)
    assert scaler.decide(59, ready_instances=5).desired == 2


def test_initial_state_counts_the_start_as_activity() -> None:
    assert initial_state(5) == AutoscalerState(last_active=5)
    assert initial_state(5, ready_instances=3) == AutoscalerState(5, 5, 3)


# ---------------------------------------------------------------------------------------
# Annotations


def test_annotations_override_the_defaults() -> None:
    annotations = {
        KEY + "target": "20",
        KEY + "target-utilization-percentage": "85",
        KEY + "window": "2m",
        KEY + "panic-window-percentage": "5",
        KEY + "panic-threshold-percentage": "150",
        KEY + "max-scale-up-rate": "4",
        KEY + "max-scale-down-rate": "1.5",
        KEY + "min-scale": "1",
        KEY + "max-scale": "7",
        KEY + "initial-scale": "2",
        KEY + "activation-scale": "3",
        KEY + "scale-down-delay": "5m",
        "run.googleapis.com/cpu-throttling": "false",
    }
    defaults = ScalingPolicy(scale_to_zero_grace=5)
    assert policy_from_annotations(annotations, 40, defaults) == ScalingPolicy(
        container_concurrency=40,
        target=20,
        target_utilization=0.85,
        stable_window=120,
        panic_window_percentage=5,
        panic_threshold_percentage=150,
        max_scale_up_rate=4,
        max_scale_down_rate=1.5,
        min_scale=1,
        max_scale=7,
        initial_scale=2,
        activation_scale=3,
        scale_to_zero_grace=5,
        scale_down_delay=300,
    )


def test_no_annotations_keep_the_defaults_with_the_revisions_concurrency() -> None:
    defaults = ScalingPolicy(stable_window=10, scale_to_zero_grace=1)
    assert policy_from_annotations({}, 1, defaults) == replace(defaults, container_concurrency=1)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("60s", 60), ("1m", 60), ("1m30s", 90), ("90", 90), ("1h", 3600), (" 6s ", 6)],
)
def test_window_accepts_seconds_minutes_and_combinations(text: str, seconds: float) -> None:
    policy = policy_from_annotations({KEY + "window": text}, 80, ScalingPolicy())
    assert policy.stable_window == seconds


def test_camel_case_spellings_are_accepted() -> None:
    annotations = {KEY + "minScale": "2", KEY + "maxScale": "9", KEY + "scaleDownDelay": "30s"}
    policy = policy_from_annotations(annotations, 80, ScalingPolicy())
    assert (policy.min_scale, policy.max_scale, policy.scale_down_delay) == (2, 9, 30)


def test_both_spellings_with_one_value_are_accepted() -> None:
    annotations = {KEY + "min-scale": "2", KEY + "minScale": "2"}
    assert policy_from_annotations(annotations, 80, ScalingPolicy()).min_scale == 2


def test_both_spellings_disagreeing_are_rejected() -> None:
    annotations = {KEY + "max-scale": "2", KEY + "maxScale": "3"}
    with pytest.raises(InvalidError) as caught:
        policy_from_annotations(annotations, 80, ScalingPolicy())
    assert caught.value.field == KEY + "maxScale"
    assert "disagree" in caught.value.message


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("window", "5s", "use a duration between 6s and 1h"),
        ("window", "2h", "use a duration between 6s and 1h"),
        ("window", "soon", "use a duration between 6s and 1h"),
        ("panic-window-percentage", "0.5", "use a number between 1 and 100"),
        ("panic-window-percentage", "101", "use a number between 1 and 100"),
        ("panic-threshold-percentage", "100", "use a number between 110 and 1000"),
        ("panic-threshold-percentage", "1001", "use a number between 110 and 1000"),
        ("target-utilization-percentage", "0", "use a number between 1 and 100"),
        ("target-utilization-percentage", "seventy", "use a number between 1 and 100"),
        ("target", "0", "use a number greater than 0"),
        ("target", "nan", "use a number greater than 0"),
        ("target", "inf", "use a number greater than 0"),
        ("max-scale-up-rate", "1", "use a number greater than 1"),
        ("max-scale-down-rate", "0.5", "use a number greater than 1"),
        ("min-scale", "-1", "use a whole number 0 or more"),
        ("min-scale", "1.5", "use a whole number 0 or more"),
        ("maxScale", "many", "use a whole number 0 or more"),
        ("initial-scale", "-2", "use a whole number 0 or more"),
        ("activation-scale", "0", "use a whole number 1 or more"),
        ("scale-down-delay", "2h", "use a duration between 0s and 1h"),
    ],
)
def test_bad_annotation_is_rejected_naming_it_and_its_range(
    name: str, value: str, allowed: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        policy_from_annotations({KEY + name: value}, 80, ScalingPolicy())
    assert caught.value.field == KEY + name
    assert caught.value.message.startswith(f"{KEY}{name}: invalid value {value!r}; {allowed}")
    assert caught.value.status == 400


def test_max_scale_below_min_scale_is_rejected() -> None:
    with pytest.raises(InvalidError) as caught:
        policy_from_annotations({KEY + "min-scale": "3", KEY + "max-scale": "2"}, 80)
    assert caught.value.field == KEY + "max-scale"
    assert "max-scale 2 is below min-scale 3" in caught.value.message


def test_min_scale_above_the_default_max_scale_is_rejected() -> None:
    with pytest.raises(InvalidError) as caught:
        policy_from_annotations({KEY + "minScale": "5"}, 80, ScalingPolicy(max_scale=4))
    assert caught.value.field == KEY + "minScale"


def test_max_scale_zero_means_unlimited_whatever_the_min() -> None:
    annotations = {KEY + "min-scale": "3", KEY + "max-scale": "0"}
    policy = policy_from_annotations(annotations, 80)
    assert (policy.min_scale, policy.max_scale) == (3, 0)
