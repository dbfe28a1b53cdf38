"""Log entries in Cloud Logging's shape, the filter language, bounded SQLite storage and
live followers.

An entry is stored as the JSON Cloud Logging would show (``timestamp``, ``severity``,
``logName``, ``resource.labels``, ``labels``, ``textPayload`` or ``jsonPayload``,
``trace``, ``httpRequest``), in its own SQLite file (WAL) whose used size is capped: the
oldest entries go first. All SQL runs on one worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import pickle
import re
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from cloudlet.dataplane.routing import RequestRecord, trace_text
from cloudlet.domain.errors import InvalidError

T = TypeVar("T")
SEVERITIES = {
    "DEFAULT": 0,
    "DEBUG": 100,
    "INFO": 200,
    "NOTICE": 300,
    "WARNING": 400,
    "ERROR": 500,
    "CRITICAL": 600,
    "ALERT": 700,
    "EMERGENCY": 800,
}
STDOUT = "run.googleapis.com/stdout"
STDERR = "run.googleapis.com/stderr"
REQUESTS = "run.googleapis.com/requests"
SYSTEM = "run.googleapis.com/varlog/system"
TRACE_FIELD = "logging.googleapis.com/trace"
LABELS_FIELD = "logging.googleapis.com/labels"
_SPECIAL = {"severity", "message", "time", "timestamp", TRACE_FIELD, LABELS_FIELD}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class LogEntry:
    """One log entry of one revision's instance (or of the platform about it)."""

    timestamp: float
    service: str
    revision: str
    namespace: str = "default"
    instance: str = ""
    severity: str = "DEFAULT"
    log_name: str = STDOUT
    message: str | None = None
    json_payload: dict[str, Any] | None = None
    trace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    http_request: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The entry as Cloud Logging shows it."""
        out: dict[str, Any] = {
            "timestamp": iso(self.timestamp),
            "severity": self.severity,
            "logName": self.log_name,
            "resource": {
                "type": "cloud_run_revision",
                "labels": {
                    "service_name": self.service,
                    "revision_name": self.revision,
                    "namespace": self.namespace,
                },
            },
            "labels": {"instanceId": self.instance, **self.labels},
        }
        if self.json_payload is not None:
            out["jsonPayload"] = self.json_payload
        else:
            out["textPayload"] = self.message or ""
        if self.trace:
            out["trace"] = self.trace
        if self.http_request is not None:
            out["httpRequest"] = self.http_request
        return out


RequestRow = tuple[
    float, str, str, str, str, str, str, int, float, int, int, str, str | None, str | None
]
"""(start, namespace, service, revision, instance, method, url, status, latency,
request bytes, response bytes, remote ip, user agent, trace id): a request log entry as
stored, compact so the batch writer stays cheap; ``request_json`` makes the entry."""


def request_row(r: RequestRecord, namespace: str) -> RequestRow:
    """The stored form of a finished request, decoded from the router's raw record."""
    user_agent = r.user_agent
    return (
        r.end - r.latency,
        namespace,
        r.service or "",
        r.revision or "",
        r.backend or "",
        r.method.decode("latin-1"),
        r.url.decode("latin-1"),
        r.status,
        r.latency,
        r.request_bytes,
        r.response_bytes,
        r.remote_ip,
        user_agent.decode("latin-1") if user_agent is not None else None,
        trace_text(r.trace),
    )


def request_json(row: RequestRow) -> dict[str, Any]:
    """The Cloud Logging entry of one request (its time is the request's start)."""
    start, ns, service, revision, instance, method, url, status, latency = row[:9]
    request_bytes, response_bytes, remote_ip, user_agent, trace_id = row[9:]
    entry = LogEntry(
        start,
        service,
        revision,
        ns,
        instance,
        "ERROR" if status >= 500 else "WARNING" if status >= 400 else "INFO",
        REQUESTS,
        message=f"{method} {status} {url}",
        trace=f"projects/{ns}/traces/{trace_id}" if trace_id else None,
        http_request={
            "requestMethod": method,
            "requestUrl": url,
            "status": status,
            "latency": f"{latency:.6f}s",
            "requestSize": str(request_bytes),
            "responseSize": str(response_bytes),
            "remoteIp": remote_ip,
            "userAgent": user_agent or "",
        },
    )
    return entry.to_json()


def parse_line(
    line: str,
    stream: str,
    timestamp: float,
    service: str,
    revision: str,
    namespace: str = "default",
    instance: str = "",
) -> LogEntry:
    """An instance's output line: a JSON object uses Cloud Logging's special fields, other
    text is DEFAULT (stdout) or ERROR (stderr)."""
    entry = LogEntry(timestamp, service, revision, namespace, instance)
    entry.log_name = STDERR if stream == "stderr" else STDOUT
    entry.severity = "ERROR" if stream == "stderr" else "DEFAULT"
    payload = _json_object(line)
    if payload is None:
        entry.message = line
        return entry
    severity = str(payload.get("severity", "")).upper()
    if severity in SEVERITIES:
        entry.severity = severity
    when = payload.get("time", payload.get("timestamp"))
    if isinstance(when, str) and (parsed := parse_time(when)) is not None:
        entry.timestamp = parsed
    if isinstance(trace := payload.get(TRACE_FIELD), str):
        entry.trace = trace
    if isinstance(labels := payload.get(LABELS_FIELD), dict):
        entry.labels = {str(k): str(v) for k, v in labels.items()}
    entry.json_payload = {k: v for k, v in payload.items() if k not in _SPECIAL}
    if "message" in payload:
        entry.json_payload["message"] = payload["message"]
    return entry


def _json_object(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- the filter language (a subset of Cloud Logging's) ----------------------------------------

_TERM = re.compile(r'\s*([A-Za-z_][\w.\-/]*)\s*(>=|<=|!=|=|>|<|:)\s*("(?:[^"\\]|\\.)*"|[^\s"]+)')
_ALIASES = {
    "revision": "resource.labels.revision_name",
    "service": "resource.labels.service_name",
    "instance": "labels.instanceId",
    "log_name": "logName",
}
Predicate = Callable[[dict[str, Any]], bool]


def parse_filter(text: str) -> Predicate:
    """``severity>=ERROR AND textPayload:"boom" httpRequest.status>=500``: terms joined by
    AND (or a space), each FIELD OP VALUE with OP one of = != > >= < <= : (contains)."""
    terms: list[Predicate] = []
    rest = text.strip()
    while rest:
        match = _TERM.match(rest)
        if match is None:
            raise InvalidError(
                f"--log-filter: cannot parse {rest!r}; write terms like "
                'severity>=ERROR or textPayload:"text" joined by AND',
                field="--log-filter",
            )
        name, op, raw = match.groups()
        terms.append(_term(_ALIASES.get(name, name), op, _unquote(raw)))
        rest = re.sub(r"^\s*(AND\s+)?", "", rest[match.end() :])
    return lambda entry: all(term(entry) for term in terms)


def _unquote(raw: str) -> str:
    return json.loads(raw) if raw.startswith('"') else raw


def _term(path: str, op: str, value: str) -> Predicate:
    if path == "severity":
        wanted = SEVERITIES.get(value.upper())
        if wanted is None:
            raise InvalidError(
                f"--log-filter: unknown severity {value!r}; use one of {', '.join(SEVERITIES)}",
                field="--log-filter",
            )
        return lambda e: _compare(SEVERITIES.get(e.get("severity", ""), 0), op, wanted)
    if path in ("message", "text"):
        return lambda e: _compare(_message(e), op, value)
    keys = path.split(".")
    return lambda e: _compare(_lookup(e, keys), op, value)


def _message(entry: dict[str, Any]) -> str:
    if "textPayload" in entry:
        return str(entry["textPayload"])
    return str(entry.get("jsonPayload", {}).get("message", ""))


def _lookup(entry: Any, keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(entry, dict) or key not in entry:
            return None
        entry = entry[key]
    return entry


def _compare(actual: Any, op: str, wanted: Any) -> bool:
    if actual is None:
        return op == "!="
    if op == ":":
        return str(wanted).lower() in str(actual).lower()
    if isinstance(actual, int | float) and not isinstance(wanted, int | float):
        try:
            wanted = float(wanted)
        except ValueError:
            return False
    elif not isinstance(actual, int | float):
        actual = str(actual)
    ops: dict[str, Callable[[Any, Any], bool]] = {
        "=": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
    }
    return ops[op](actual, wanted)


# -- storage -------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  ts REAL NOT NULL,
  namespace TEXT NOT NULL,
  service TEXT NOT NULL,
  severity INTEGER NOT NULL,
  body TEXT NOT NULL
);
DROP INDEX IF EXISTS entries_service;
DROP TABLE IF EXISTS requests;
CREATE TABLE IF NOT EXISTS request_chunks (
  id INTEGER PRIMARY KEY,
  last_ts REAL NOT NULL,
  count INTEGER NOT NULL,
  body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_services (
  namespace TEXT NOT NULL, service TEXT NOT NULL, chunk INTEGER NOT NULL,
  PRIMARY KEY (namespace, service, chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
  namespace TEXT NOT NULL, service TEXT NOT NULL, revision TEXT NOT NULL,
  instance TEXT NOT NULL, start REAL NOT NULL, end REAL NOT NULL,
  cpu REAL NOT NULL, memory_gib REAL NOT NULL, mode TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS spans_end ON spans (end);
CREATE TABLE IF NOT EXISTS writer_frames (
  epoch TEXT PRIMARY KEY, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS request_counts (
  namespace TEXT NOT NULL, service TEXT NOT NULL, revision TEXT NOT NULL,
  hour INTEGER NOT NULL, count INTEGER NOT NULL,
  PRIMARY KEY (namespace, service, revision, hour)
);
"""
SCAN_LIMIT = 200_000
"""Newest entries a read looks at, at most, to find ``limit`` matches. The table has no
secondary index (it would cost every write more than it saves reads); rows are in
arrival order, so the newest are the last ids."""
CHUNK_SCAN_LIMIT = 500
"""Newest request chunks of a service a read decodes, at most."""


class RequestColumns(NamedTuple):
    """A batch of the router's request records as columns: a few long tuples pickle, and
    feed counters, far faster than many short ones."""

    end: tuple[float, ...]
    service: tuple[str | None, ...]
    revision: tuple[str | None, ...]
    backend: tuple[str | None, ...]
    method: tuple[bytes, ...]
    url: tuple[bytes, ...]
    status: tuple[int, ...]
    latency: tuple[float, ...]
    request_bytes: tuple[int, ...]
    response_bytes: tuple[int, ...]
    remote_ip: tuple[str, ...]
    user_agent: tuple[bytes | None, ...]
    trace: tuple[int | bytes | None, ...]

    def records(self) -> Iterator[RequestRecord]:
        for values in zip(*self, strict=True):
            yield tuple.__new__(RequestRecord, values)


NO_REQUESTS = RequestColumns((), (), (), (), (), (), (), (), (), (), (), (), ())


def columns_of(records: list[RequestRecord]) -> RequestColumns:
    if not records:
        return NO_REQUESTS
    return tuple.__new__(RequestColumns, zip(*records, strict=True))


def pack_requests(columns: RequestColumns, namespaces: dict[str, str]) -> bytes:
    """A chunk of request records as stored: pickled columns and the revisions'
    namespaces (decoded only when someone reads the logs)."""
    return pickle.dumps((tuple(columns), namespaces), protocol=pickle.HIGHEST_PROTOCOL)


def unpack_requests(body: bytes) -> tuple[RequestColumns, dict[str, str]]:
    columns, namespaces = pickle.loads(body)
    return tuple.__new__(RequestColumns, columns), namespaces


class Batch(NamedTuple):
    """What the telemetry hub hands the log writer every flush."""

    entries: list[dict[str, Any]]
    """Log entries as Cloud Logging shows them."""
    requests: bytes | None
    """Request records (``pack_requests``), stored as they are."""
    spans: list[tuple[Any, ...]]
    """Closed billing spans (namespace, service, revision, instance, start, end, cpu,
    memory GiB, mode)."""


class LogStore:
    """The telemetry database (logs.db): entries under a size cap, billing spans, request
    counts. ``apply`` stores a batch in one transaction; the server calls it only in its
    log writer process (``cloudlet.telemetry.writer``), so no write runs on the router's
    loop. Reads use a second connection, through ``run`` on a worker thread (WAL lets
    them proceed while the writer writes)."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._db = _connect(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(f"PRAGMA journal_size_limit={max(1 << 20, max_bytes // 4)}")
        self._db.executescript(_SCHEMA)
        self._reader = _connect(path)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudlet-logs")
        self.dropped_for_space = 0

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run a blocking read on the store's one worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, func, *args)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._reader.close()
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def apply(self, batch: Batch, epoch: str = "", seq: int = 0) -> None:
        """Store a batch in one transaction, then enforce the size cap. Request records
        are stored as the chunk they came in, indexed by the services they belong to, and
        counted per revision and hour for billing. With an ``epoch`` (one per log writer
        session) the batch's ``seq`` is stored with it, so a batch resent after the
        writer crashed is recognised (``applied``) and not stored twice."""
        entries = [_entry_row(e) for e in batch.entries]
        with self._tx() as db:
            db.executemany(
                "INSERT INTO entries (ts, namespace, service, severity, body) VALUES (?,?,?,?,?)",
                entries,
            )
            if batch.requests is not None:
                self._insert_chunk(db, batch.requests)
            db.executemany("INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?)", batch.spans)
            if epoch:
                db.execute(
                    "INSERT INTO writer_frames VALUES (?, ?) "
                    "ON CONFLICT (epoch) DO UPDATE SET seq = excluded.seq",
                    (epoch, seq),
                )
        if entries or batch.requests is not None:
            self.enforce_cap()

    @staticmethod
    def _insert_chunk(db: sqlite3.Connection, body: bytes) -> None:
        columns, namespaces = unpack_requests(body)
        hours = map(int, map((3600.0).__rfloordiv__, columns.end))
        counts = Counter(zip(columns.service, columns.revision, hours, strict=True))
        chunk = db.execute(
            "INSERT INTO request_chunks (last_ts, count, body) VALUES (?,?,?)",
            (max(columns.end, default=0.0), len(columns.end), body),
        ).lastrowid
        services = {
            (namespaces.get(revision, "default"), service)
            for service, revision, _ in counts
            if service and revision
        }
        db.executemany(
            "INSERT INTO chunk_services VALUES (?,?,?)", [(*pair, chunk) for pair in services]
        )
        db.executemany(
            "INSERT INTO request_counts VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE "
            "SET count = count + excluded.count",
            [
                (namespaces.get(revision, "default"), service, revision, hour, n)
                for (service, revision, hour), n in counts.items()
                if service and revision
            ],
        )

    def applied(self, epoch: str) -> int:
        """The last batch number of this writer session that is stored (0: none)."""
        row = self._db.execute("SELECT seq FROM writer_frames WHERE epoch=?", (epoch,)).fetchone()
        return int(row[0]) if row else 0

    def forget_sessions(self, keep: str) -> None:
        """Drop the batch numbers of other writer sessions (they have ended)."""
        self._db.execute("DELETE FROM writer_frames WHERE epoch != ?", (keep,))

    def used_bytes(self) -> int:
        pages = self._db.execute("PRAGMA page_count").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def enforce_cap(self) -> None:
        """Drop the oldest entries, a tenth at a time, until the data fits the cap."""
        for _ in range(50):
            if self.used_bytes() <= self.max_bytes:
                return
            dropped = 0
            with self._tx() as db:
                for table in ("entries", "request_chunks"):
                    count = db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    drop = (count + 9) // 10
                    db.execute(
                        f"DELETE FROM {table} WHERE id IN "
                        f"(SELECT id FROM {table} ORDER BY id LIMIT ?)",
                        (drop,),
                    )
                    dropped += drop
                db.execute(
                    "DELETE FROM chunk_services WHERE chunk < "
                    "(SELECT coalesce(min(id), 1 << 62) FROM request_chunks)"
                )
            if dropped == 0:
                return
            self.dropped_for_space += dropped

    def read(
        self,
        namespace: str,
        service: str,
        limit: int,
        since: float | None = None,
        predicate: Predicate | None = None,
    ) -> list[dict[str, Any]]:
        """Newest first: up to ``limit`` entries of a service at or after ``since``."""
        since = since or 0
        logged = (
            (ts, json.loads(body))
            for ts, body in self._reader.execute(
                "SELECT ts, body FROM entries "
                "WHERE id > (SELECT coalesce(max(id), 0) FROM entries) - ? "
                "AND namespace=? AND service=? AND ts>=? ORDER BY id DESC",
                (SCAN_LIMIT, namespace, service, since),
            )
        )
        requests = self._requests(namespace, service, since)
        found: list[dict[str, Any]] = []
        for _, entry in heapq.merge(logged, requests, key=lambda pair: pair[0], reverse=True):
            if predicate is None or predicate(entry):
                found.append(entry)
                if len(found) >= limit:
                    break
        found.sort(key=lambda e: str(e["timestamp"]), reverse=True)
        return found

    def _requests(
        self, namespace: str, service: str, since: float
    ) -> Iterator[tuple[float, dict[str, Any]]]:
        """(start, entry) of a service's requests that ended at or after ``since``, the
        newest chunks first, each chunk's requests newest first."""
        chunks = self._reader.execute(
            "SELECT c.body FROM chunk_services s JOIN request_chunks c ON c.id = s.chunk "
            "WHERE s.namespace=? AND s.service=? AND c.last_ts>=? ORDER BY s.chunk DESC LIMIT ?",
            (namespace, service, since, CHUNK_SCAN_LIMIT),
        )
        for (body,) in chunks:
            columns, namespaces = unpack_requests(body)
            rows = [
                request_row(r, namespace)
                for r in columns.records()
                if r.service == service
                and r.revision
                and r.end >= since
                and namespaces.get(r.revision, "default") == namespace
            ]
            rows.sort(key=lambda row: row[0], reverse=True)
            yield from ((row[0], request_json(row)) for row in rows)

    def usage(
        self, namespace: str, since: float, service: str | None
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Spans (service, revision, instance, start, end, cpu, memory_gib, mode) ending at
        or after ``since``, and request counts (service, revision, count) since then."""
        where, args = "namespace=? AND {col}>=?", [namespace, since]
        if service:
            where += " AND service=?"
            args.append(service)
        spans = self._reader.execute(
            "SELECT service, revision, instance, start, end, cpu, memory_gib, mode FROM spans "
            "WHERE " + where.format(col="end"),
            args,
        ).fetchall()
        args[1] = int(since // 3600)
        counts = self._reader.execute(
            "SELECT service, revision, sum(count) FROM request_counts WHERE "
            + where.format(col="hour")
            + " GROUP BY service, revision",
            args,
        ).fetchall()
        return spans, counts


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA busy_timeout=10000")  # the writer process and readers share the file
    return db


def _entry_row(e: dict[str, Any]) -> tuple[float, str, str, int, str]:
    labels = e["resource"]["labels"]
    return (
        parse_time(e["timestamp"]) or 0.0,
        labels["namespace"],
        labels["service_name"],
        SEVERITIES.get(e["severity"], 0),
        json.dumps(e, separators=(",", ":")),
    )


class Followers:
    """Live tails: each follower gets the entries of its service as they are stored, and
    ``None`` when the server closes."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subs: dict[asyncio.Queue[dict[str, Any] | None], tuple[str, str]] = {}

    def subscribe(self, namespace: str, service: str) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self._queue_size)
        self._subs[queue] = (namespace, service)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subs.pop(queue, None)

    def publish(self, entries: list[dict[str, Any]]) -> None:
        """Hand entries to their followers; a follower too slow to keep up misses some."""
        if not self._subs:
            return
        for entry in entries:
            labels = entry["resource"]["labels"]
            key = (labels["namespace"], labels["service_name"])
            for queue, wanted in self._subs.items():
                if wanted == key and not queue.full():
                    queue.put_nowait(entry)

    def wanted(self) -> set[tuple[str, str]]:
        """The (namespace, service) pairs someone follows."""
        return set(self._subs.values())

    def close(self) -> None:
        """End every follow (the server is stopping)."""
        for queue in list(self._subs):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(None)
        self._subs.clear()
