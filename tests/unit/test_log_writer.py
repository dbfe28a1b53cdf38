"""The log writer process: batches reach logs.db off the router's loop, a killed writer is
replaced and loses nothing it was sent, a resent batch is not stored twice, and what waits
unacknowledged is bounded."""

from __future__ import annotations

import io
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlet.dataplane.routing import RequestRecord
from cloudlet.telemetry import writer
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import Batch, LogStore, columns_of, pack_requests
from cloudlet.telemetry.writer import LogWriter, frame, serve


def _requests(count: int, start: float = 1000.0) -> bytes:
    records = [
        RequestRecord(
            start + i, "svc", "svc-1", "i1", b"GET", b"/n/%d" % i, 200, 0.01, 0, 2, "::1", None, i
        )
        for i in range(count)
    ]
    return pack_requests(columns_of(records), {"svc-1": "default"})


def _stored(store: LogStore) -> list[str]:
    return [e["httpRequest"]["requestUrl"] for e in store.read("default", "svc", 100_000)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LogStore]:
    db = LogStore(tmp_path / "logs.db", 64 * 2**20)
    yield db
    db.close()


async def test_batches_reach_the_database_through_the_writer_process(store: LogStore) -> None:
    log_writer = LogWriter(store.path, store.max_bytes)
    await log_writer.start()
    try:
        assert log_writer.pid is not None and log_writer.pid != os.getpid()
        assert log_writer.submit(Batch([], _requests(3), []))
        await log_writer.sync()
        assert sorted(_stored(store)) == ["/n/0", "/n/1", "/n/2"]
        [entry] = store.read("default", "svc", 1, predicate=None)
        assert entry["trace"] == f"projects/default/traces/{2:032x}"
    finally:
        await log_writer.close()


async def test_a_killed_writer_is_replaced_and_every_batch_is_stored_once(
    store: LogStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "RESTART_DELAY", 0.05)
    log_writer = LogWriter(store.path, store.max_bytes)
    await log_writer.start()
    try:
        first = log_writer.pid
        for n in range(20):
            log_writer.submit(Batch([], _requests(10, start=1000.0 + 10 * n), []))
        assert first is not None
        os.kill(first, signal.SIGKILL)
        for n in range(20, 40):
            log_writer.submit(Batch([], _requests(10, start=1000.0 + 10 * n), []))
        await log_writer.sync()
        assert log_writer.restarts == 1 and log_writer.pid != first
        stored = _stored(store)
        assert len(stored) == 400  # the 40 batches of 10, none lost, none twice
    finally:
        await log_writer.close()


def test_a_batch_resent_after_a_crash_is_not_stored_twice(store: LogStore) -> None:
    batches = [Batch([], _requests(5, start=1000.0 + 5 * n), []) for n in range(3)]
    acks = io.StringIO()
    serve(store, "epoch-a", io.BytesIO(frame(1, batches[0]) + frame(2, batches[1])), acks)
    # the first writer stored 1 and 2 but died before its acks arrived: all three come again
    again = b"".join(frame(n + 1, b) for n, b in enumerate(batches))
    serve(store, "epoch-a", io.BytesIO(again), acks)
    assert acks.getvalue().split() == ["1", "2", "1", "2", "3"]
    assert len(_stored(store)) == 15
    assert store.applied("epoch-a") == 3


def test_a_frame_cut_short_is_not_stored_or_acknowledged(store: LogStore) -> None:
    acks = io.StringIO()
    whole = frame(1, Batch([], _requests(2), []))
    serve(store, "epoch-b", io.BytesIO(whole + frame(2, Batch([], _requests(2), []))[:-3]), acks)
    assert acks.getvalue().split() == ["1"]
    assert len(_stored(store)) == 2


async def test_batches_beyond_the_backlog_are_refused_not_buffered(store: LogStore) -> None:
    log_writer = LogWriter(store.path, store.max_bytes, backlog_bytes=2000)
    body = _requests(10)
    accepted = [log_writer.submit(Batch([], body, [])) for _ in range(10)]  # writer not started
    assert accepted[0] and not accepted[-1]
    kept = accepted.count(True)
    await log_writer.start()
    await log_writer.sync()
    await log_writer.close()
    assert len(_stored(store)) == 10 * kept


async def test_closing_stores_what_is_pending_and_ends_the_process(store: LogStore) -> None:
    log_writer = LogWriter(store.path, store.max_bytes)
    await log_writer.start()
    pid = log_writer.pid
    log_writer.submit(Batch([], _requests(4), []))
    await log_writer.close()
    assert len(_stored(store)) == 4
    assert pid is not None
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.01)
    assert not Path(f"/proc/{pid}").exists()


async def test_a_read_does_not_hang_on_a_writer_that_cannot_start(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "logs.db", 2**20)
    broken = LogWriter(tmp_path / "missing-dir" / "logs.db", 2**20)  # every start fails
    telemetry = Telemetry(store, sink=broken)
    await broken.start()
    try:
        telemetry.request_done(_record())
        await telemetry.sync(timeout=0.3)
        assert store.read("default", "svc", 10) == []
    finally:
        await broken.close(timeout=0.3)
        store.close()


def _record() -> RequestRecord:
    return RequestRecord(1.0, "svc", "svc-1", "i1", b"GET", b"/", 200, 0.01, 0, 2, "::1", None, 1)
