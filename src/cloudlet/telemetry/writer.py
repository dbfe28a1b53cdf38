"""The log writer: a child process that owns every write to logs.db, so that storing
request logs costs the router's event loop only the pickling of each batch.

The server's side (``LogWriter``) numbers each batch, pipes it to the child as a frame
(a 12-byte header with the batch's number and length, then the pickled ``Batch``) and
keeps it until the child acknowledges it with a line holding its number, written after
the batch's transaction commits. If the child dies, a new one starts and the batches not
yet acknowledged are sent again; the child skips those its predecessor had already stored
(``LogStore.applied``), so a crash of the writer loses nothing it was sent and stores
nothing twice. What waits unacknowledged is bounded (``backlog_bytes``): past it, new
batches are refused and counted as dropped, never buffered without end.

    python -m cloudlet.telemetry.writer DB MAX_BYTES EPOCH
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import secrets
import signal
import struct
import sys
from pathlib import Path
from typing import BinaryIO, Protocol, TextIO

from cloudlet.telemetry.logs import Batch, LogStore

log = logging.getLogger("cloudlet.telemetry")
_HEADER = struct.Struct(">QI")
RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
"""Seconds before restarting a writer that died, doubling while it keeps dying."""


class Sink(Protocol):
    """Where the telemetry hub's batches go."""

    async def start(self) -> None: ...

    def submit(self, batch: Batch) -> bool:
        """Take a batch; False when it had to be dropped."""
        ...

    async def sync(self) -> None:
        """Return once every batch submitted so far is stored."""
        ...

    async def close(self) -> None: ...


class InlineSink:
    """Stores each batch at once on the caller's thread (tools and tests; the server uses
    ``LogWriter``)."""

    def __init__(self, store: LogStore) -> None:
        self.store = store

    async def start(self) -> None:
        return None

    def submit(self, batch: Batch) -> bool:
        self.store.apply(batch)
        return True

    async def sync(self) -> None:
        return None

    async def close(self) -> None:
        return None


class LogWriter:
    """The server's side of the log writer process; see the module doc."""

    def __init__(self, path: Path, max_bytes: int, *, backlog_bytes: int = 256 * 2**20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.epoch = secrets.token_hex(8)
        self.backlog_bytes = backlog_bytes
        self.restarts = 0
        self._seq = 0
        self._unacked: dict[int, bytes] = {}
        """Batch number → pickled batch, oldest first."""
        self._backlog = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._acks: asyncio.Task[None] | None = None
        self._progress = asyncio.Event()
        self._closing = False
        self._failures = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Start the child and send it what is still unacknowledged."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cloudlet.telemetry.writer",
            str(self.path),
            str(self.max_bytes),
            self.epoch,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._proc = proc
        for seq, data in self._unacked.items():
            self._send(seq, data)
        self._acks = asyncio.get_running_loop().create_task(self._read_acks(proc))

    def submit(self, batch: Batch) -> bool:
        data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
        if self._backlog + len(data) > self.backlog_bytes:
            return False
        self._seq += 1
        self._unacked[self._seq] = data
        self._backlog += len(data)
        self._send(self._seq, data)
        return True

    async def sync(self) -> None:
        """Wait until every batch submitted so far is stored (a dead writer is restarted
        and the batches resent, so this waits through that too)."""
        target = self._seq
        while self._unacked and next(iter(self._unacked)) <= target:
            self._progress.clear()
            await self._progress.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Store what is pending (up to ``timeout``), then end the child."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sync(), timeout)
        self._closing = True
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._acks is not None:  # it ends at the writer's EOF, or sleeps before a restart
            done, _ = await asyncio.wait([self._acks], timeout=1.0)
            if not done:
                self._acks.cancel()
            await asyncio.gather(self._acks, return_exceptions=True)
        if self._unacked:
            log.warning("the log writer stopped with %d batches unstored", len(self._unacked))

    def _send(self, seq: int, data: bytes) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None or proc.stdin is None:
            return  # sent again when the writer (re)starts
        if proc.stdin.is_closing():
            return
        proc.stdin.write(_HEADER.pack(seq, len(data)))
        proc.stdin.write(data)

    async def _read_acks(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                seq = int(line)
            except ValueError:
                log.error("the log writer said %r instead of a batch number; restarting it", line)
                proc.kill()
                break
            self._failures = 0
            self._acknowledge(seq)
        code = await proc.wait()
        if self._closing:
            return
        self.restarts += 1
        self._failures += 1
        delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (self._failures - 1))
        log.warning("the log writer exited with code %s; starting a new one in %.1f s", code, delay)
        await asyncio.sleep(delay)
        if not self._closing:
            await self.start()

    def _acknowledge(self, seq: int) -> None:
        unacked = self._unacked
        while unacked:
            first = next(iter(unacked))
            if first > seq:
                break
            self._backlog -= len(unacked.pop(first))
        self._progress.set()


def frame(seq: int, batch: Batch) -> bytes:
    """One batch as the writer reads it (for tools and tests; ``LogWriter`` writes the
    header and the pickle separately)."""
    data = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(seq, len(data)) + data


def serve(store: LogStore, epoch: str, source: BinaryIO, out: TextIO) -> None:
    """The child's loop: store each frame from ``source``, acknowledge it on ``out``."""
    store.forget_sessions(epoch)
    done = store.applied(epoch)
    while len(header := source.read(_HEADER.size)) == _HEADER.size:
        seq, size = _HEADER.unpack(header)
        data = source.read(size)
        if len(data) < size:
            break  # the server died mid-frame; it is resent to the next writer
        if seq > done:
            store.apply(pickle.loads(data), epoch, seq)
            done = seq
        out.write(f"{seq}\n")
        out.flush()


def main(argv: list[str]) -> int:
    path, max_bytes, epoch = Path(argv[0]), int(argv[1]), argv[2]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server ends us by closing stdin
    store = LogStore(path, max_bytes)
    try:
        serve(store, epoch, sys.stdin.buffer, sys.stdout)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
