"""Prometheus metrics (text exposition format 0.0.4) and the recent-traffic summary that
`services describe` prints.

Counters and histograms are fed from batches of request records (never per request on the
router's path); gauges (instances by state, in flight, queue depth) are read from the
live objects when scraped.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudlet.telemetry.logs import RequestColumns

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STARTUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 240.0)
RECENT_WINDOW = 300.0
"""Seconds of traffic the summary covers."""
RECENT_SAMPLES = 20_000
Labels = tuple[tuple[str, str], ...]


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    return repr(float(value)) if value != math.inf else "+Inf"


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def observe_many(self, values: Sequence[float]) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        counts = self.counts
        bucket_of = functools.partial(bisect.bisect_left, self.buckets)
        for index, n in Counter(map(bucket_of, values)).items():
            if index < len(counts):
                counts[index] += n
        self.total += math.fsum(values)
        self.count += len(values)

    def lines(self, name: str, labels: Labels) -> Iterable[str]:
        running = 0
        counts = self.counts or [0] * len(self.buckets)
        for bound, n in zip(self.buckets, counts, strict=True):
            running += n
            yield f"{name}_bucket{_labels((*labels, ('le', _num(bound))))} {running}"
        yield f"{name}_bucket{_labels((*labels, ('le', '+Inf')))} {self.count}"
        yield f"{name}_sum{_labels(labels)} {_num(self.total)}"
        yield f"{name}_count{_labels(labels)} {self.count}"


@dataclass
class Family:
    name: str
    kind: str
    help: str
    values: dict[Labels, float] = field(default_factory=dict)
    histograms: dict[Labels, Histogram] = field(default_factory=dict)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def observe(self, labels: Labels, value: float, buckets: tuple[float, ...]) -> None:
        self.histogram(labels, buckets).observe(value)

    def histogram(self, labels: Labels, buckets: tuple[float, ...]) -> Histogram:
        histogram = self.histograms.get(labels)
        if histogram is None:
            histogram = self.histograms[labels] = Histogram(buckets)
        return histogram

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(labels)} {_num(value)}"
        for labels, histogram in sorted(self.histograms.items()):
            yield from histogram.lines(self.name, labels)


Columns = tuple[Sequence[int], Sequence[float], Sequence[float]]
"""(statuses, latencies, end times) of one revision's requests in a batch."""


def _by_revision(columns: RequestColumns) -> dict[tuple[str | None, str | None], Columns]:
    pairs = list(zip(columns.service, columns.revision, strict=True))
    distinct = set(pairs)
    if len(distinct) <= 1:
        return {pair: (columns.status, columns.latency, columns.end) for pair in distinct}
    picked: dict[tuple[str | None, str | None], list[int]] = {}
    for i, pair in enumerate(pairs):
        picked.setdefault(pair, []).append(i)
    return {
        pair: (
            [columns.status[i] for i in indices],
            [columns.latency[i] for i in indices],
            [columns.end[i] for i in indices],
        )
        for pair, indices in picked.items()
    }


def code_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class Metrics:
    """Everything /metrics shows that is not read live, and the recent-traffic window."""

    def __init__(self) -> None:
        self.requests = Family(
            "cloudlet_requests_total", "counter", "Requests by service, revision, code class."
        )
        self.latency = Family(
            "cloudlet_request_latency_seconds", "histogram", "Request latency at the router."
        )
        self.cold_starts = Family(
            "cloudlet_cold_starts_total", "counter", "Instances started (each is a cold start)."
        )
        self.startup = Family(
            "cloudlet_startup_latency_seconds",
            "histogram",
            "Seconds from container start to its port accepting.",
        )
        self.billable = Family(
            "cloudlet_billable_instance_seconds_total",
            "counter",
            "Billable instance seconds (closed spans, rounded up to 100 ms).",
        )
        self.dropped = Family(
            "cloudlet_request_logs_dropped_total",
            "counter",
            "Request records dropped because the log buffer was full.",
        )
        self.dropped.values[()] = 0.0
        self.recent: dict[str, tuple[deque[float], deque[float]]] = {}
        """Service → (end times, latencies) of its latest requests (two deques of floats:
        no tuple per request)."""
        self.recent_starts: dict[str, deque[float]] = {}

    def observe_requests(self, columns: RequestColumns) -> None:
        """A flushed batch of the router's request records, as columns: each revision's
        share is counted with C-level iteration (the common batch, all of one revision,
        runs no Python code per request)."""
        for (service, revision), (statuses, latencies, ends) in _by_revision(columns).items():
            self._observe(service or "", revision or "", statuses, latencies)
            if service:
                recent_ends, recent_latencies = self._recent(service)
                recent_ends.extend(ends)
                recent_latencies.extend(latencies)

    def _observe(
        self, service: str, revision: str, statuses: Sequence[int], latencies: Sequence[float]
    ) -> None:
        labels = (("service", service), ("revision", revision))
        for klass, n in Counter(map((100).__rfloordiv__, statuses)).items():
            self.requests.inc((*labels, ("code_class", code_class(klass * 100))), n)
        self.latency.histogram(labels, LATENCY_BUCKETS).observe_many(latencies)

    def _recent(self, service: str) -> tuple[deque[float], deque[float]]:
        recent = self.recent.get(service)
        if recent is None:
            recent = self.recent[service] = (
                deque(maxlen=RECENT_SAMPLES),
                deque(maxlen=RECENT_SAMPLES),
            )
        return recent

    def observe_start(self, service: str, revision: str, startup: float, now: float) -> None:
        labels = (("service", service), ("revision", revision))
        self.cold_starts.inc(labels)
        self.startup.observe(labels, startup, STARTUP_BUCKETS)
        self.recent_starts.setdefault(service, deque(maxlen=1000)).append(now)

    def render(self, live: Iterable[Family] = ()) -> str:
        families = [
            self.requests,
            self.latency,
            self.cold_starts,
            self.startup,
            self.billable,
            self.dropped,
            *live,
        ]
        return "\n".join(line for f in families for line in f.render()) + "\n"

    def summary(self, service: str, now: float, window: float = RECENT_WINDOW) -> dict[str, Any]:
        """Requests/s, latency percentiles and cold starts of the last ``window`` seconds."""
        since = now - window
        ends, latencies_of = self.recent.get(service, ((), ()))
        latencies = sorted(lat for end, lat in zip(ends, latencies_of, strict=True) if end >= since)
        starts = sum(1 for t in self.recent_starts.get(service, ()) if t >= since)
        return {
            "window_seconds": window,
            "requests": len(latencies),
            "requests_per_second": len(latencies) / window,
            "latency_p50": percentile(latencies, 0.50),
            "latency_p95": percentile(latencies, 0.95),
            "latency_p99": percentile(latencies, 0.99),
            "cold_starts": starts,
        }


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when there are none)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]
