"""Billing spans, rounding, usage and cost with Cloud Run's rules, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloudlet.domain.errors import InvalidError
from cloudlet.telemetry.billing import (
    InstanceMeter,
    Prices,
    RevisionShape,
    Span,
    Usage,
    busy_spans,
    ceiling_per_hour,
    load_prices,
    report,
    reprice,
    round_up,
    usage_by_revision,
)

# (event, time) scripts for one instance; events: start, ready, busy, idle, stop, gone
SCRIPTS = [
    (
        "startup alone is billed",
        "request",
        [("start", 0.0), ("ready", 1.23), ("stop", 50.0), ("gone", 50.04)],
        [(0.0, 1.23), (50.0, 50.04)],
    ),
    (
        "idle gaps between requests are free",
        "request",
        [("start", 0), ("ready", 1), ("busy", 2), ("idle", 2.25), ("busy", 7), ("idle", 7.01)],
        [(0, 1), (2, 2.25), (7, 7.01)],
    ),
    (
        "a request still in flight when startup ends joins the startup span",
        "request",
        [("start", 0), ("busy", 0.8), ("ready", 1), ("idle", 1.4)],
        [(0, 1.4)],
    ),
    (
        "shutdown while a request drains is one span",
        "request",
        [("start", 0), ("ready", 1), ("busy", 5), ("stop", 5.5), ("idle", 6), ("gone", 6.2)],
        [(0, 1), (5, 6.2)],
    ),
    (
        "instance-based billing counts the whole life",
        "instance",
        [("start", 0), ("ready", 1), ("busy", 5), ("idle", 6), ("stop", 20), ("gone", 20.3)],
        [(0, 20.3)],
    ),
]


def _play(mode: str, script: list[tuple[str, float]]) -> list[Span]:
    meter = InstanceMeter("svc", "svc-00001-abc", "i1", 1.0, 0.5, mode)  # type: ignore[arg-type]
    for event, at in script:
        {
            "start": meter.started,
            "ready": meter.ready,
            "busy": lambda t: meter.set_busy(t, True),
            "idle": lambda t: meter.set_busy(t, False),
            "stop": meter.stopping_now,
            "gone": meter.stopped,
        }[event](at)
    return meter.take_closed()


@pytest.mark.parametrize(("name", "mode", "script", "wanted"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_meter_spans_follow_cloud_run_rules(
    name: str, mode: str, script: list[tuple[str, float]], wanted: list[tuple[float, float]]
) -> None:
    assert [(s.start, s.end) for s in _play(mode, script)] == wanted


@pytest.mark.parametrize(
    ("requests", "spans"),
    [
        ([], []),
        ([(1, 2)], [(1, 2)]),
        ([(1, 3), (2, 4)], [(1, 4)]),  # overlapping: one span, first arrival to last departure
        ([(1, 5), (2, 3)], [(1, 5)]),  # nested
        ([(3, 4), (1, 2)], [(1, 2), (3, 4)]),  # an idle gap between them is free
        ([(1, 2), (2, 3)], [(1, 3)]),  # back to back
    ],
)
def test_requests_in_flight_merge_into_busy_spans(
    requests: list[tuple[float, float]], spans: list[tuple[float, float]]
) -> None:
    assert busy_spans(requests) == spans


@pytest.mark.parametrize(
    ("seconds", "billed"),
    [(0.0, 0.0), (0.001, 0.1), (0.1, 0.1), (0.1 + 0.2, 0.3), (0.11, 0.2), (1.23, 1.3)],
)
def test_each_span_is_rounded_up_to_100_ms(seconds: float, billed: float) -> None:
    assert round_up(seconds) == billed


def test_the_open_span_is_cut_at_now_and_stays_open() -> None:
    meter = InstanceMeter("s", "r", "i", 2.0, 1.0, "request")
    meter.started(10.0)
    current = meter.open_span(10.55)
    assert current is not None and (current.start, current.end, current.billable) == (
        10.0,
        10.55,
        0.6,
    )
    meter.ready(11.0)
    assert meter.open_span(12.0) is None


def _span(start: float, end: float, mode: str = "request") -> Span:
    return Span("svc", "rev", "i1", start, end, 2.0, 0.5, mode)  # type: ignore[arg-type]


def test_usage_is_cpu_and_memory_times_billable_seconds_plus_requests() -> None:
    shapes = {"rev": RevisionShape("svc", "rev", 2.0, 0.5, "request", 3)}
    [row] = usage_by_revision(
        [_span(0, 0.25), _span(1, 2)], {("svc", "rev"): 1000}, shapes, Prices()
    )
    assert (row.billable_seconds, row.vcpu_seconds, row.gib_seconds) == (
        pytest.approx(1.3),
        pytest.approx(2.6),
        pytest.approx(0.65),
    )
    assert row.requests == 1000
    assert row.cost == pytest.approx(2.6 * 0.000024 + 0.65 * 0.0000025 + 1000 * 0.40 / 1e6)


def test_instance_based_revisions_use_the_instance_prices() -> None:
    shapes = {"rev": RevisionShape("svc", "rev", 1.0, 1.0, "instance", 0)}
    spans = [Span("svc", "rev", "i", 0, 10, 1.0, 1.0, "instance")]
    [row] = usage_by_revision(spans, {}, shapes, Prices())
    assert row.cost == pytest.approx(10 * 0.000018 + 10 * 0.000002)
    assert row.ceiling_per_hour is None  # no --max-instances: no bound


def test_max_instances_implies_an_hourly_ceiling() -> None:
    shape = RevisionShape("svc", "rev", 1.0, 0.5, "request", 10)
    assert ceiling_per_hour(shape, Prices()) == pytest.approx(10 * 3600 * (0.000024 + 0.00000125))


def test_the_free_tier_is_taken_off_the_total() -> None:
    big = Usage("svc", "rev", vcpu_seconds=200_000, gib_seconds=100_000, requests=3_000_000)
    rows = reprice([big], Prices())
    result = report(rows, Prices())
    assert result.total.cost == pytest.approx(200_000 * 0.000024 + 100_000 * 0.0000025 + 1.2)
    assert result.cost_after_free_tier == pytest.approx(20_000 * 0.000024 + 0.4)


def test_a_price_file_overrides_some_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("request_vcpu_second: 0.00001\nfree_requests: 0\n")
    prices = load_prices(path)
    assert prices.request_vcpu_second == 0.00001
    assert prices.free_requests == 0
    assert prices.request_gib_second == Prices().request_gib_second


@pytest.mark.parametrize(
    ("text", "says"),
    [("vcpu: 1\n", "unknown price 'vcpu'"), ("- 1\n", "mapping"), ("free_requests: x\n", "number")],
)
def test_a_bad_price_file_is_refused_by_name(tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(InvalidError, match=says):
        load_prices(path)
