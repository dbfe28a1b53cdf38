"""Log line parsing, the filter language, the capped store, followers, the batch writer
and the metrics it feeds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlet import settings
from cloudlet.dataplane.routing import RequestRecord
from cloudlet.domain.errors import InvalidError
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import (
    REQUESTS,
    STDERR,
    Batch,
    Followers,
    LogEntry,
    LogStore,
    columns_of,
    parse_filter,
    parse_line,
)
from cloudlet.telemetry.metrics import Metrics, percentile


def _parse(line: str, stream: str = "stdout") -> LogEntry:
    return parse_line(line, stream, 1000.0, "svc", "svc-00001-abc", "default", "i1")


def test_a_text_line_on_stdout_is_default_severity() -> None:
    entry = _parse("hello world")
    assert (entry.severity, entry.message, entry.json_payload) == ("DEFAULT", "hello world", None)


def test_a_text_line_on_stderr_is_an_error() -> None:
    entry = _parse("Traceback (most recent call last):", "stderr")
    assert (entry.severity, entry.log_name) == ("ERROR", STDERR)


def test_a_json_line_uses_cloud_loggings_special_fields() -> None:
    entry = _parse(
        '{"severity":"warning","message":"slow","time":"2026-01-02T03:04:05.5Z",'
        '"logging.googleapis.com/trace":"projects/p/traces/abc",'
        '"logging.googleapis.com/labels":{"user":"ann"},"took_ms":1200}'
    )
    assert entry.severity == "WARNING"
    assert entry.timestamp == 1767323045.5
    assert entry.trace == "projects/p/traces/abc"
    assert entry.labels == {"user": "ann"}
    assert entry.json_payload == {"message": "slow", "took_ms": 1200}
    shown = entry.to_json()
    assert shown["jsonPayload"]["message"] == "slow"
    assert shown["labels"] == {"instanceId": "i1", "user": "ann"}
    assert shown["resource"]["labels"]["revision_name"] == "svc-00001-abc"


@pytest.mark.parametrize("line", ["{not json", "[1, 2]", '{"severity": "LOUD"}'])
def test_lines_that_are_not_json_objects_or_unknown_severities_keep_defaults(line: str) -> None:
    assert _parse(line).severity == "DEFAULT"


def _json(severity: str = "INFO", text: str = "x", **extra: Any) -> dict[str, Any]:
    entry = LogEntry(1000.0, "svc", "rev-1", severity=severity, message=text, **extra)
    return entry.to_json()


@pytest.mark.parametrize(
    ("text", "entry", "matches"),
    [
        ("severity>=ERROR", _json("ERROR"), True),
        ("severity>=ERROR", _json("WARNING"), False),
        ("severity=info", _json("INFO"), True),
        ("severity!=INFO", _json("INFO"), False),
        ('textPayload:"BOOM"', _json(text="it went boom"), True),
        ("message:boom", _json(text="fine"), False),
        ("revision=rev-1 AND severity<WARNING", _json("INFO"), True),
        ("revision=rev-2 severity<WARNING", _json("INFO"), False),
        ("httpRequest.status>=500", _json(http_request={"status": 503}), True),
        ("httpRequest.status>=500", _json(http_request={"status": 200}), False),
        ("httpRequest.status>=500", _json(), False),
        (f'logName="{REQUESTS}"', _json(log_name=REQUESTS), True),
    ],
)
def test_filters_select_entries(text: str, entry: dict[str, Any], matches: bool) -> None:
    assert parse_filter(text)(entry) is matches


@pytest.mark.parametrize(
    ("text", "says"),
    [("severity>=LOUD", "unknown severity 'LOUD'"), ("= INFO", "cannot parse")],
)
def test_a_bad_filter_is_refused_naming_the_flag(text: str, says: str) -> None:
    with pytest.raises(InvalidError, match=says) as caught:
        parse_filter(text)
    assert "--log-filter" in caught.value.message


def _write(store: LogStore, entries: list[dict[str, Any]]) -> None:
    store.apply(Batch(entries, None, []))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    db = LogStore(tmp_path / "logs.db", 1 << 20)
    yield db
    db.close()


def test_reads_are_newest_first_and_filtered(store: LogStore) -> None:
    _write(
        store,
        [_json("INFO", f"line {i}") | {"timestamp": f"2026-01-01T00:00:0{i}Z"} for i in range(5)],
    )
    entries = store.read("default", "svc", 2, predicate=parse_filter("severity>=INFO"))
    assert [e["textPayload"] for e in entries] == ["line 4", "line 3"]
    assert store.read("default", "other", 10) == []


def test_the_store_drops_the_oldest_entries_beyond_its_cap(store: LogStore) -> None:
    for batch in range(40):
        _write(store, [_json(text=f"{batch}-{i} " + "x" * 400) for i in range(200)])
    assert store.used_bytes() <= store.max_bytes
    assert store.dropped_for_space > 0
    newest = store.read("default", "svc", 1)[0]["textPayload"]
    assert newest.startswith("39-199 ")
    oldest_kept = store.read("default", "svc", 10_000)[-1]["textPayload"]
    assert not oldest_kept.startswith("0-")


def test_entries_survive_reopening_the_store(tmp_path: Path) -> None:
    first = LogStore(tmp_path / "logs.db", 1 << 20)
    _write(first, [_json(text="kept")])
    first.close()
    again = LogStore(tmp_path / "logs.db", 1 << 20)
    assert again.read("default", "svc", 5)[0]["textPayload"] == "kept"
    again.close()


async def test_followers_get_their_services_entries_and_end_on_close() -> None:
    followers = Followers()
    mine = followers.subscribe("default", "svc")
    other = followers.subscribe("default", "else")
    followers.publish([_json(text="hello")])
    assert (await mine.get())["textPayload"] == "hello"  # type: ignore[index]
    assert other.empty()
    followers.close()
    assert await mine.get() is None


def _record(status: int = 200, latency: float = 0.05, end: float = 100.0) -> RequestRecord:
    return RequestRecord(
        end, "svc", "rev-1", "i1", b"GET", b"/x", status, latency, 0, 5, "127.0.0.1", b"ua", b"abc"
    )


async def test_the_writer_stores_request_entries_in_batches(store: LogStore) -> None:
    telemetry = Telemetry(store)
    telemetry.request_done(_record(503, 0.25))
    assert store.read("default", "svc", 5) == []  # nothing written on the request's path
    await telemetry.flush()
    [entry] = store.read("default", "svc", 5)
    assert entry["severity"] == "ERROR"
    assert entry["httpRequest"]["status"] == 503
    assert entry["httpRequest"]["latency"] == "0.250000s"
    assert entry["trace"] == "projects/default/traces/abc"
    assert 'code_class="5xx"' in telemetry.render_metrics()


async def test_a_full_buffer_drops_records_and_counts_them(store: LogStore) -> None:
    telemetry = Telemetry(store, buffer_limit=3)
    for _ in range(5):
        telemetry.request_done(_record())
    await telemetry.flush()
    assert len(store.read("default", "svc", 10)) == 3
    assert "cloudlet_request_logs_dropped_total 2.0" in telemetry.render_metrics()


async def test_the_flush_task_runs_without_being_asked(store: LogStore) -> None:
    telemetry = Telemetry(store, flush_interval=0.01)
    task = asyncio.create_task(telemetry.run())
    telemetry.request_done(_record())
    try:
        for _ in range(500):
            if store.read("default", "svc", 1):
                break
            await asyncio.sleep(0.01)
        assert len(store.read("default", "svc", 1)) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_metrics_show_requests_latency_and_the_recent_summary() -> None:
    metrics = Metrics()
    metrics.observe_requests(
        columns_of([_record(200, i / 100, end=100.0 + i) for i in range(1, 101)])
    )
    metrics.observe_start("svc", "rev-1", 0.7, 150.0)
    text = metrics.render()
    assert 'cloudlet_requests_total{service="svc",revision="rev-1",code_class="2xx"} 100.0' in text
    assert (
        'cloudlet_request_latency_seconds_bucket{service="svc",revision="rev-1",le="0.1"} 10'
        in text
    )
    assert 'cloudlet_startup_latency_seconds_count{service="svc",revision="rev-1"} 1' in text
    summary = metrics.summary("svc", now=200.0, window=300)
    assert summary["requests"] == 100
    assert (summary["latency_p50"], summary["latency_p95"], summary["latency_p99"]) == (
        0.5,
        0.95,
        0.99,
    )
    assert summary["cold_starts"] == 1
    assert metrics.summary("svc", now=1000.0, window=300)["requests"] == 0


def test_percentile_of_nothing_is_none() -> None:
    assert percentile([], 0.5) is None


def test_the_log_cap_comes_from_a_flag_or_the_environment() -> None:
    assert settings.load({}, log_retention_bytes="512Mi").log_retention_bytes == 512 * 2**20
    env = {"CLOUDLET_LOG_RETENTION_BYTES": "1Gi"}
    assert settings.load(env).log_retention_bytes == 2**30
    assert settings.load({}).log_retention_bytes == 256 * 2**20


@pytest.mark.parametrize(("value", "says"), [("10", "too small"), ("lots", "memory quantity")])
def test_a_bad_log_cap_is_refused_naming_the_flag(value: str, says: str) -> None:
    with pytest.raises(InvalidError, match=says) as caught:
        settings.load({}, log_retention_bytes=value)
    assert "--log-retention-bytes" in caught.value.message


def test_metrics_split_a_batch_of_several_revisions_by_revision() -> None:
    metrics = Metrics()
    records = [_record(200, 0.01, end=100.0 + i) for i in range(3)]
    other = RequestRecord(
        104.0, "svc", "rev-2", "i2", b"GET", b"/", 503, 0.5, 0, 1, "::1", None, None
    )
    metrics.observe_requests(columns_of([records[0], other, *records[1:]]))
    text = metrics.render()
    assert 'cloudlet_requests_total{service="svc",revision="rev-1",code_class="2xx"} 3.0' in text
    assert 'cloudlet_requests_total{service="svc",revision="rev-2",code_class="5xx"} 1.0' in text
    assert metrics.summary("svc", now=200.0, window=300)["requests"] == 4
