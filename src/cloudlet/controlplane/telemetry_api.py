"""HTTP routes for logs, the traffic summary and billing (documented in docs/telemetry.md).

All live under ``/apis/cloudlet.dev/v1/namespaces/{namespace}/``:
``services/{service}/logs`` (newest first), ``services/{service}/logs/tail`` (NDJSON,
following), ``services/{service}/metrics`` (the last minutes), ``billing/report`` and
``billing/spans``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.quantities import parse_duration
from cloudlet.telemetry.billing import Prices, Span, report, usage_by_revision
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import iso, parse_filter

BASE = "/apis/cloudlet.dev/v1/namespaces/{namespace}"
MAX_LIMIT = 10_000


def parse_freshness(value: str, field: str = "freshness") -> float:
    """Seconds in ``1h``, ``30m``, ``2d`` or ``600``."""
    text = value.strip()
    if text.endswith("d") and text[:-1].isdigit():
        return int(text[:-1]) * 86400.0
    return float(parse_duration(text, field))


def parse_since(value: str | None, now: float) -> float:
    """A date or time (ISO 8601, UTC unless it says otherwise); default: this month's start."""
    if not value:
        today = datetime.fromtimestamp(now, UTC)
        return today.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidError(
            f"since: {value!r} is not a date; use YYYY-MM-DD or an ISO 8601 time",
            field="since",
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _limit(value: int) -> int:
    if not 1 <= value <= MAX_LIMIT:
        raise InvalidError(f"limit: {value} must be between 1 and {MAX_LIMIT}", field="limit")
    return value


def add_telemetry_routes(app: FastAPI, telemetry: Telemetry | None) -> None:
    """Register the routes; without ``telemetry`` (tests of the API alone) there are none."""
    if telemetry is None:
        return
    _log_routes(app, telemetry)
    _billing_routes(app, telemetry)


def _log_routes(app: FastAPI, telemetry: Telemetry) -> None:
    store = telemetry.store

    @app.get(BASE + "/services/{service}/logs")
    async def read_logs(
        namespace: str,
        service: str,
        limit: int = 100,
        freshness: str | None = None,
        filter: str = "",
    ) -> dict[str, Any]:
        since = telemetry.now() - parse_freshness(freshness) if freshness else None
        predicate = parse_filter(filter) if filter else None
        await telemetry.sync()
        entries = await store.run(store.read, namespace, service, _limit(limit), since, predicate)
        return {"entries": entries}

    @app.get(BASE + "/services/{service}/logs/tail")
    async def tail_logs(namespace: str, service: str, filter: str = "") -> StreamingResponse:
        predicate = parse_filter(filter) if filter else None
        queue = telemetry.followers.subscribe(namespace, service)

        async def lines() -> AsyncIterator[bytes]:
            try:
                yield b"\n"  # headers and a first byte now, so clients know they follow
                while (entry := await queue.get()) is not None:
                    if predicate is None or predicate(entry):
                        yield json.dumps(entry).encode() + b"\n"
            finally:
                telemetry.followers.unsubscribe(queue)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.get(BASE + "/services/{service}/metrics")
    async def service_metrics(namespace: str, service: str) -> dict[str, Any]:
        await telemetry.sync()
        summary = telemetry.metrics.summary(service, telemetry.now())
        summary["instances"] = telemetry.instance_count(namespace, service)
        return summary


def _billing_routes(app: FastAPI, telemetry: Telemetry) -> None:
    @app.get(BASE + "/billing/report")
    async def billing_report(
        namespace: str, service: str | None = None, since: str | None = None
    ) -> dict[str, Any]:
        now = telemetry.now()
        start = parse_since(since, now)
        spans, requests = await _usage(telemetry, namespace, start, service)
        shapes = {
            name: shape
            for name, shape in telemetry.shapes(namespace).items()
            if not service or shape.service == service
        }
        prices = Prices()
        rows = usage_by_revision(spans, requests, shapes, prices)
        body = report(rows, prices).as_dict()
        return {"since": iso(start), "until": iso(now), "prices": asdict(prices), **body}

    @app.get(BASE + "/billing/spans")
    async def billing_spans(
        namespace: str, service: str | None = None, since: str | None = None
    ) -> dict[str, Any]:
        start = parse_since(since, telemetry.now())
        spans, _ = await _usage(telemetry, namespace, start, service)
        return {"spans": [{**asdict(s), "billable": s.billable} for s in spans]}


async def _usage(
    telemetry: Telemetry, namespace: str, since: float, service: str | None
) -> tuple[list[Span], dict[tuple[str, str], int]]:
    """Stored and in-progress spans (clipped to ``since``) and request counts."""
    await telemetry.sync()
    store = telemetry.store
    rows, counts = await store.run(store.usage, namespace, since, service)
    spans = [Span(*row) for row in rows]
    spans += [s for s in telemetry.open_spans(namespace) if not service or s.service == service]
    clipped = [_clip(s, since) for s in spans if s.end >= since]
    return clipped, {(svc, rev): int(n) for svc, rev, n in counts}


def _clip(span: Span, since: float) -> Span:
    if span.start >= since:
        return span
    return Span(
        span.service,
        span.revision,
        span.instance,
        since,
        span.end,
        span.cpu,
        span.memory_gib,
        span.mode,
    )
