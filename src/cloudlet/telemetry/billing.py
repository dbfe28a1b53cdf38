"""Billing with Cloud Run's rules: pure span arithmetic, usage and cost. No I/O here.

Request-based billing (the default) counts an instance while it starts, while at least one
request is in flight, and while it shuts down; instance-based billing (CPU always
allocated, ``run.googleapis.com/cpu-throttling: "false"``) counts its whole life. Each
billable span is rounded up to 100 ms. Times are plain floats from an injected clock.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from cloudlet.domain.errors import InvalidError

BillingMode = Literal["request", "instance"]
GRANULARITY = 0.1
"""Billable spans are rounded up to this many seconds."""
GIB = 2.0**30


def round_up(seconds: float) -> float:
    """A span's billable length: rounded up to the next 100 ms (a tiny epsilon forgiven)."""
    if seconds <= 0:
        return 0.0
    steps = math.ceil(round(seconds / GRANULARITY, 9))
    return round(steps * GRANULARITY, 1)


def busy_spans(requests: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge (start, end) request times into the spans an instance had >= 1 in flight."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(requests):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class Span:
    """One billable stretch of one instance."""

    service: str
    revision: str
    instance: str
    start: float
    end: float
    cpu: float
    """vCPUs (the cpu limit)."""
    memory_gib: float
    mode: BillingMode

    @property
    def billable(self) -> float:
        return round_up(self.end - self.start)


class InstanceMeter:
    """One instance's billable state; every transition is O(1).

    The instance is billable while ``starting``, ``busy`` or ``stopping`` (request-based),
    or while alive (instance-based). A transition that makes it billable opens a span; one
    that ends the last reason closes it.
    """

    __slots__ = (
        "_open",
        "alive",
        "busy",
        "closed",
        "cpu",
        "instance",
        "memory_gib",
        "mode",
        "revision",
        "service",
        "starting",
        "stopping",
    )

    def __init__(
        self,
        service: str,
        revision: str,
        instance: str,
        cpu: float,
        memory_gib: float,
        mode: BillingMode,
    ) -> None:
        self.service = service
        self.revision = revision
        self.instance = instance
        self.cpu = cpu
        self.memory_gib = memory_gib
        self.mode: BillingMode = mode
        self.alive = self.starting = self.busy = self.stopping = False
        self._open: float | None = None
        self.closed: list[Span] = []

    def _billable(self) -> bool:
        if self.mode == "instance":
            return self.alive
        return self.alive and (self.starting or self.busy or self.stopping)

    def _set(self, now: float, name: str, value: bool) -> None:
        before = self._billable()
        setattr(self, name, value)
        after = self._billable()
        if after and not before:
            self._open = now
        elif before and not after and self._open is not None:
            self.closed.append(self._span(self._open, now))
            self._open = None

    def _span(self, start: float, end: float) -> Span:
        return Span(
            self.service,
            self.revision,
            self.instance,
            start,
            end,
            self.cpu,
            self.memory_gib,
            self.mode,
        )

    def started(self, now: float) -> None:
        self.starting = True
        self._set(now, "alive", True)

    def ready(self, now: float) -> None:
        self._set(now, "starting", False)

    def set_busy(self, now: float, busy: bool) -> None:
        self._set(now, "busy", busy)

    def stopping_now(self, now: float) -> None:
        self._set(now, "stopping", True)

    def stopped(self, now: float) -> None:
        self._set(now, "alive", False)

    def open_span(self, now: float) -> Span | None:
        """The span in progress, cut at ``now`` (for reports while an instance runs)."""
        return self._span(self._open, now) if self._open is not None else None

    def take_closed(self) -> list[Span]:
        spans, self.closed = self.closed, []
        return spans


@dataclass(frozen=True)
class Prices:
    """Price table in US dollars; defaults are Cloud Run tier 1."""

    request_vcpu_second: float = 0.000024
    request_gib_second: float = 0.0000025
    instance_vcpu_second: float = 0.000018
    instance_gib_second: float = 0.000002
    per_million_requests: float = 0.40
    free_vcpu_seconds: float = 180_000
    free_gib_seconds: float = 360_000
    free_requests: float = 2_000_000

    def vcpu_second(self, mode: BillingMode) -> float:
        return self.request_vcpu_second if mode == "request" else self.instance_vcpu_second

    def gib_second(self, mode: BillingMode) -> float:
        return self.request_gib_second if mode == "request" else self.instance_gib_second


def load_prices(path: Path) -> Prices:
    """A price table from a YAML or JSON file; keys are Prices' field names."""
    flag = "--price-file"
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix != ".json" else None
        data = json.loads(path.read_text()) if data is None else data
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise InvalidError(f"{flag}: cannot read {path}: {exc}", field=flag) from None
    if not isinstance(data, Mapping):
        raise InvalidError(f"{flag}: {path} must hold a mapping of price names", field=flag)
    known = {f.name for f in fields(Prices)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidError(
            f"{flag}: unknown price {unknown[0]!r}; use one of {', '.join(sorted(known))}",
            field=flag,
        )
    try:
        return replace(Prices(), **{k: float(v) for k, v in data.items()})
    except (TypeError, ValueError):
        raise InvalidError(f"{flag}: every price must be a number", field=flag) from None


@dataclass
class Usage:
    """Usage and cost of one revision (or a total)."""

    service: str
    revision: str
    mode: BillingMode = "request"
    billable_seconds: float = 0.0
    vcpu_seconds: float = 0.0
    gib_seconds: float = 0.0
    requests: int = 0
    cost: float = 0.0
    cpu: float = 0.0
    """vCPUs per instance (for the ceiling)."""
    memory_gib: float = 0.0
    max_instances: int = 0
    """0 = unbounded."""
    ceiling_per_hour: float | None = None
    """Cost per hour if max_instances instances were billable all the time."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RevisionShape:
    """What a revision costs per second while billable."""

    service: str
    revision: str
    cpu: float
    memory_gib: float
    mode: BillingMode
    max_instances: int


def usage_by_revision(
    spans: Iterable[Span],
    requests: Mapping[tuple[str, str], int],
    shapes: Mapping[str, RevisionShape],
    prices: Prices,
) -> list[Usage]:
    """Per-revision usage of the spans and request counts, costed without the free tier."""
    rows: dict[tuple[str, str], Usage] = {}
    for span in spans:
        row = rows.setdefault(
            (span.service, span.revision), Usage(span.service, span.revision, span.mode)
        )
        seconds = span.billable
        row.billable_seconds += seconds
        row.vcpu_seconds += seconds * span.cpu
        row.gib_seconds += seconds * span.memory_gib
    for (service, revision), count in requests.items():
        rows.setdefault((service, revision), Usage(service, revision)).requests += count
    for shape in shapes.values():
        row = rows.setdefault((shape.service, shape.revision), Usage(shape.service, shape.revision))
        row.mode, row.cpu, row.memory_gib = shape.mode, shape.cpu, shape.memory_gib
        row.max_instances = shape.max_instances
    return reprice(sorted(rows.values(), key=lambda r: (r.service, r.revision)), prices)


def reprice(rows: list[Usage], prices: Prices) -> list[Usage]:
    """Set each row's cost and hourly ceiling from a price table (in place; returns rows)."""
    for row in rows:
        row.cost = cost_of(row, prices)
        if row.cpu or row.memory_gib:
            shape = RevisionShape(
                row.service, row.revision, row.cpu, row.memory_gib, row.mode, row.max_instances
            )
            row.ceiling_per_hour = ceiling_per_hour(shape, prices)
    return rows


def cost_of(row: Usage, prices: Prices) -> float:
    return (
        row.vcpu_seconds * prices.vcpu_second(row.mode)
        + row.gib_seconds * prices.gib_second(row.mode)
        + row.requests * prices.per_million_requests / 1e6
    )


def ceiling_per_hour(shape: RevisionShape, prices: Prices) -> float | None:
    """The most an hour can cost: every allowed instance billable all hour (None: no bound)."""
    if shape.max_instances <= 0:
        return None
    per_second = shape.cpu * prices.vcpu_second(shape.mode) + shape.memory_gib * prices.gib_second(
        shape.mode
    )
    return shape.max_instances * per_second * 3600


@dataclass
class Report:
    """A billing report: rows, their total, and the total after the monthly free tier."""

    rows: list[Usage]
    total: Usage
    free_tier: dict[str, float] = field(default_factory=dict)
    cost_after_free_tier: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [r.as_dict() for r in self.rows],
            "total": self.total.as_dict(),
            "free_tier": self.free_tier,
            "cost_after_free_tier": self.cost_after_free_tier,
        }


def report(rows: list[Usage], prices: Prices) -> Report:
    """Totals the rows and applies the monthly free tier to the total."""
    total = Usage("*", "*")
    for row in rows:
        total.billable_seconds += row.billable_seconds
        total.vcpu_seconds += row.vcpu_seconds
        total.gib_seconds += row.gib_seconds
        total.requests += row.requests
        total.cost += row.cost
    ceilings = [r.ceiling_per_hour for r in rows]
    if rows and all(c is not None for c in ceilings):
        total.ceiling_per_hour = sum(c for c in ceilings if c is not None)
    free = {
        "vcpu_seconds": prices.free_vcpu_seconds,
        "gib_seconds": prices.free_gib_seconds,
        "requests": prices.free_requests,
    }
    return Report(rows, total, free, _after_free_tier(rows, prices))


def _after_free_tier(rows: list[Usage], prices: Prices) -> float:
    """Cost once the free tier is used up, spending it on rows in order."""
    left = {"cpu": prices.free_vcpu_seconds, "mem": prices.free_gib_seconds}
    requests = sum(r.requests for r in rows)
    cost = max(0.0, requests - prices.free_requests) * prices.per_million_requests / 1e6
    for row in rows:
        cpu = max(0.0, row.vcpu_seconds - left["cpu"])
        mem = max(0.0, row.gib_seconds - left["mem"])
        left["cpu"] = max(0.0, left["cpu"] - row.vcpu_seconds)
        left["mem"] = max(0.0, left["mem"] - row.gib_seconds)
        cost += cpu * prices.vcpu_second(row.mode) + mem * prices.gib_second(row.mode)
    return cost
