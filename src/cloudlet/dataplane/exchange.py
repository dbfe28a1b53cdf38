"""One request's trip through the router: slot, upstream connection, response, outcome.

An ``Exchange`` is the activator ticket of a request and the sink of its upstream
connection's response. The client protocol creates it once the request head is parsed and
starts it when it is that connection's turn (requests pipelined on a connection are answered
in order). Everything here runs in callbacks: no task, except to open a new connection.

Fields that most requests never change are class-level defaults: an exchange is built for
every request, and each attribute set in ``__init__`` costs time on the hot path.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, cast

from cloudlet.dataplane.activator import Backend, RevisionEndpoint, Ticket
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
    # set for every request in __init__
    client: RouterProtocol
    method: bytes
    url: bytes
    keep_alive: bool
    http11: bool
    req_done: bool
    """The request message has been read whole."""
    t0: float
    # the request as routed
    endpoint: RevisionEndpoint | None = None
    head: bytes = b""
    """The rewritten request head sent upstream."""
    chunked_in: bool = False
    expect_continue: bool = False
    error: tuple[int, str] | None = None
    """Status and message to answer instead of proxying."""
    has_body: bool = False
    body: list[bytes] | None = None
    """Request body pieces: buffered before a connection is attached, then kept for a
    retry while ``replayable``."""
    body_size: int = 0
    replayable: bool = False
    retried: bool = False
    # the upstream side
    upstream: UpstreamConnection | None = None
    connecting: ConnectTask | None = None
    # the outcome
    started: bool = False
    """The response head is on its way to the client."""
    finished: bool = False
    close_after: bool = False
    status: int = 0
    req_bytes: int = 0
    resp_bytes: int = 0
    trace_id: bytes | int | None = None
    user_agent: bytes | None = None

    def __init__(
        self,
        client: RouterProtocol,
        method: bytes,
        url: bytes,
        keep_alive: bool,
        http11: bool,
        body_expected: bool,
        t0: float,
    ) -> None:
        self.client = client
        self.method = method
        self.url = url
        self.keep_alive = keep_alive
        self.http11 = http11
        self.req_done = not body_expected
        self.t0 = t0
        # read on every request: set here, as reading a class-level default is slower
        self.error = None
        self.expect_continue = False
        self.close_after = False
        if body_expected:
            self.has_body = True
            self.body = []
        else:
            self.body = None

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
            conn = cast(UpstreamConnection, idle.pop())
            transport = conn.transport
            if conn.closed or transport is None or transport.is_closing():
                conn.close()  # the instance closed it while it sat idle
                continue
            if self.body is None and not self.client.write_paused:  # the common case
                self.upstream = conn
                conn.exchange = self
                conn.write_client = self.client.writelines
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
        conn.attach(self, self.client.writelines, self.method == b"HEAD")
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
