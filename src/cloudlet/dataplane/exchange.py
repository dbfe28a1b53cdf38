"""One request's trip through the router: slot, upstream connection, response, outcome.

An ``Exchange`` is the activator ticket of a request and the sink of its upstream
connection's response. The client protocol creates it once the request head is parsed and
starts it when it is that connection's turn (requests pipelined on a connection are answered
in order). Everything here runs in callbacks: no task, except to open a new connection.

An exchange is built for every request: it has slots, all set in ``__init__``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from cloudlet.dataplane.activator import Backend, RevisionEndpoint, Ticket
from cloudlet.dataplane.routing import RequestRecord
from cloudlet.dataplane.upstream import (
    CHUNKED,
    NO_BODY,
    RAW,
    WAITING,
    UpstreamConnection,
    connect,
)
from cloudlet.dataplane.wire import CONTINUE, CRLF, LAST_CHUNK, chunk_size_line

if TYPE_CHECKING:
    from cloudlet.dataplane.proxy import RouterProtocol

BUFFER_LIMIT = 64 * 1024
"""Request body bytes held while waiting for a slot or connection before reading pauses."""
REPLAY_LIMIT = 64 * 1024
"""Request bodies up to this size are kept until the response starts, to retry once."""

UPSTREAM_FULL = 1
BUFFERING = 2

_CONNECTION_CLOSE = b"Connection: close\r\n"
_CONNECTION_KEEP_ALIVE = b"Connection: keep-alive\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"

ConnectTask = asyncio.Task[tuple[asyncio.Transport, UpstreamConnection]]


class Exchange(Ticket):
    __slots__ = (
        "backend",
        "body",
        "body_size",
        "chunked_in",
        "client",
        "close_after",
        "connecting",
        "deadline",
        "endpoint",
        "error",
        "expect_continue",
        "finished",
        "has_body",
        "head",
        "http11",
        "keep_alive",
        "method",
        "plain",
        "replayable",
        "req_bytes",
        "req_done",
        "resp_bytes",
        "retried",
        "started",
        "state",
        "status",
        "t0",
        "trace_id",
        "upstream",
        "url",
        "user_agent",
    )
    client: RouterProtocol
    method: bytes
    url: bytes
    keep_alive: bool
    http11: bool
    req_done: bool
    """The request message has been read whole."""
    endpoint: RevisionEndpoint | None
    head: bytes
    """The rewritten request head sent upstream."""
    body: list[bytes] | None
    """Request body pieces: buffered before a connection is attached, then kept for a
    retry while ``replayable``."""
    close_after: bool
    plain: bool
    """A keep-alive HTTP/1.1 request without body, not HEAD: a response with a length
    passes with its head as it is."""
    t0: float
    chunked_in: bool
    expect_continue: bool
    error: tuple[int, str] | None
    """Status and message to answer instead of proxying."""
    has_body: bool
    body_size: int
    replayable: bool
    retried: bool
    upstream: UpstreamConnection | None
    connecting: ConnectTask | None
    started: bool
    """The response head is on its way to the client."""
    finished: bool
    status: int
    req_bytes: int
    resp_bytes: int
    trace_id: bytes | int | None
    user_agent: bytes | None

    def __init__(
        self,
        client: RouterProtocol,
        method: bytes,
        url: bytes,
        keep_alive: bool,
        endpoint: RevisionEndpoint | None,
        head: bytes,
    ) -> None:
        # every slot, set once (slots: no instance dict to build and grow per request)
        self.client = client
        self.method = method
        self.url = url
        self.keep_alive = self.http11 = keep_alive
        self.req_done = True
        self.endpoint = endpoint
        self.head = head
        self.body = None
        self.close_after = self.chunked_in = self.expect_continue = self.has_body = False
        self.replayable = self.retried = self.started = self.finished = False
        self.plain = keep_alive and method != b"HEAD"
        self.t0 = self.deadline = 0.0
        self.error = self.upstream = self.connecting = self.trace_id = None
        self.user_agent = self.backend = None
        self.body_size = self.status = self.req_bytes = self.resp_bytes = self.state = 0

    def expect_body(self) -> None:
        """The request has a body to read (and to send on)."""
        self.req_done = False
        self.has_body = True
        self.body = []
        self.plain = False

    # -- the client's side ------------------------------------------------------------------

    def start(self) -> None:
        """It is this request's turn on its connection: answer it or ask for a slot."""
        if self.error is not None:  # an unread body means closing after the answer
            self.finished = True
            self.client.send_error(self, *self.error)
            return
        if self.expect_continue and not self.req_done:
            self.client.write(CONTINUE)
        endpoint = self.endpoint
        assert endpoint is not None
        endpoint.submit(self)

    def request_body(self, data: bytes) -> None:
        size = len(data)
        self.req_bytes += size
        if self.finished or self.error is not None:
            return
        if self.chunked_in:
            limit = self.client.settings.max_body_bytes
            if self.req_bytes > limit:
                self.client.stop_reading()
                self.fail(413, f"the request body is over the limit of {limit} bytes")
                return
            pieces = [chunk_size_line(size), data, CRLF]
        else:
            pieces = [data]
        conn = self.upstream
        body = self.body
        if conn is not None:
            if len(pieces) == 1:
                conn.write(data)
            else:
                conn.writelines(pieces)
            if self.replayable and body is not None:
                self.body_size += size
                if self.body_size > REPLAY_LIMIT:
                    self.replayable = False
                    self.body = None
                else:
                    body += pieces
        elif body is not None:
            body += pieces
            self.body_size += size
            if self.body_size > BUFFER_LIMIT:
                self.client.block_reading(BUFFERING)

    def request_complete(self) -> None:
        if self.req_done:
            return
        self.req_done = True
        if self.finished:
            return
        if self.upstream is not None and self.chunked_in:
            self.upstream.write(LAST_CHUNK)

    def client_gone(self) -> None:
        if not self.finished:
            self.finished = True
            self._let_go()

    # -- the activator's side ---------------------------------------------------------------

    def on_slot(self, backend: Backend) -> None:
        idle = backend.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                conn.close()  # the instance closed it while it sat idle
                continue
            if self.body is None and not self.client.write_paused:  # the common case
                self.upstream = conn
                conn.exchange = self
                conn.write_client = self.client.writelines
                conn.write_client_bytes = self.client.write_bytes
                if self.method == b"HEAD":
                    conn.no_body = True
                transport.write(self.head)
            else:
                self._attach(conn)
            return
        self.connecting = connect(backend, self._connected)

    def on_refused(self, status: int, message: str) -> None:
        self.finished = True
        self.client.send_error(self, status, message)

    def on_deadline(self) -> None:
        endpoint = self.endpoint
        assert endpoint is not None
        self.fail(
            504,
            f"upstream request timeout: revision {endpoint.revision} did not respond within "
            f"{endpoint.timeout:g}s",
        )

    def on_backend_lost(self, reason: str) -> None:
        backend = self.backend
        assert backend is not None
        self.fail(502, f"instance {backend.id} stopped: {reason}")

    # -- the upstream connection's side -------------------------------------------------------

    def _connected(self, task: ConnectTask) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if task is not self.connecting:  # nobody waits for it any more
            if error is None:
                task.result()[1].recycle()
            return
        self.connecting = None
        backend = self.backend
        assert backend is not None and self.endpoint is not None
        if error is not None:
            self.endpoint.report_error(backend.id)
            self.fail(502, f"could not connect to instance {backend.id}: {error}")
            return
        self._attach(task.result()[1])

    def _attach(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        client = self.client
        conn.attach(self, client.writelines, client.write_bytes, self.method == b"HEAD")
        if self.client.write_paused:
            conn.pause_reading()
        body = self.body
        if body is None:  # no request body: the common case
            conn.write(self.head)
            return
        self.replayable = conn.pooled and not self.retried and self.body_size <= REPLAY_LIMIT
        pieces = [self.head, *body]
        if self.req_done and self.chunked_in:
            pieces.append(LAST_CHUNK)
        conn.writelines(pieces)
        if not self.replayable:
            self.body = None
        self.client.unblock_reading(BUFFERING)

    def response_head(self, status: int, out: list[bytes], has_length: int) -> int:
        endpoint = self.endpoint
        assert endpoint is not None
        endpoint.started(self)  # the timeout no longer applies
        self.started = True
        self.status = status
        keep_alive = self.keep_alive
        if status == 204 or status == 304 or self.method == b"HEAD":
            framing = NO_BODY
        elif has_length:
            framing = RAW
        elif keep_alive and self.http11:
            framing = CHUNKED
            out.append(_CHUNKED)
        else:
            framing = RAW  # delimited by closing the connection
            keep_alive = False
        if keep_alive and self.req_done and not self.client.closing:
            if not self.http11:
                out.append(_CONNECTION_KEEP_ALIVE)
        else:
            out.append(_CONNECTION_CLOSE)
            self.close_after = True
        out.append(CRLF)
        return framing

    def response_done(self, conn: UpstreamConnection, reusable: bool) -> None:
        self.finished = True
        self.upstream = None
        self.resp_bytes = conn.resp_bytes
        if reusable and self.req_done:
            conn.recycle()
        else:
            conn.close()
        endpoint = self.endpoint
        assert endpoint is not None
        endpoint.finish(self)
        self.client.exchange_done(self, self.close_after)

    def upstream_lost(self, conn: UpstreamConnection, message: str) -> None:
        self.upstream = None
        if self.finished:
            return
        backend = self.backend
        endpoint = self.endpoint
        assert backend is not None and endpoint is not None
        if (
            conn.pooled
            and conn.phase == WAITING
            and (self.replayable or not self.has_body)
            and not self.retried
            and not backend.removed
        ):
            # the instance closed an idle keep-alive connection as we reused it
            self.retried = True
            self.client.unblock_reading(UPSTREAM_FULL)
            self.connecting = connect(backend, self._connected)
            return
        endpoint.report_error(backend.id)
        self.fail(502, f"instance {backend.id} {message}")

    def upstream_paused(self, paused: bool) -> None:
        if paused:
            self.client.block_reading(UPSTREAM_FULL)
        else:
            self.client.unblock_reading(UPSTREAM_FULL)

    def record(self, remote_ip: str) -> RequestRecord:
        """What request logs and metrics keep of this request (raw; see RequestRecord)."""
        endpoint = self.endpoint
        backend = self.backend
        t0 = self.t0
        # tuple.__new__ skips the NamedTuple's Python-level __new__ (the hot path)
        return tuple.__new__(
            RequestRecord,
            (
                time.time(),
                endpoint.service if endpoint is not None else None,
                endpoint.revision if endpoint is not None else None,
                backend.id if backend is not None else None,
                self.method,
                self.url,
                self.status,
                time.monotonic() - t0 if t0 else 0.0,
                self.req_bytes,
                self.resp_bytes,
                remote_ip,
                self.user_agent,
                self.trace_id,
            ),
        )

    # -- endings ------------------------------------------------------------------------------

    def fail(self, status: int, message: str) -> None:
        """End the request with an error response, or cut the response short if it began."""
        if self.finished:
            return
        self.finished = True
        self._let_go()
        if self.started:
            self.client.abort(self)
        else:
            self.client.send_error(self, status, message)

    def _let_go(self) -> None:
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.close()
        task = self.connecting
        if task is not None:
            self.connecting = None
            task.cancel()
        if self.endpoint is not None:
            self.endpoint.finish(self)


__all__ = ["BUFFERING", "BUFFER_LIMIT", "NO_BODY", "RAW", "UPSTREAM_FULL", "Exchange"]
