"""The router's client side: accept connections, parse requests, hand them to exchanges.

``RouterProtocol`` is one client connection. It parses requests with httptools, answers
what it can itself (unknown host, refused caller, malformed or oversized request), and
otherwise builds the rewritten request head and starts an ``Exchange``, one at a time per
connection. ``Router`` holds the settings, the open connections and the sweep that enforces
the header and idle timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.exchange import BUFFERING, UPSTREAM_FULL, Exchange
from cloudlet.dataplane.routing import RequestRecord, RoutingTable
from cloudlet.dataplane.wire import (
    AUTHORIZATION,
    CLOUD_TRACE,
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    EXPECT,
    FORWARDED,
    FRESH_TRACE,
    HOST,
    SEEN_NAMES,
    SPAN_MASK,
    TRACEPARENT,
    TRANSFER_ENCODING,
    USER_AGENT,
    X_FORWARDED_FOR,
    connection_options,
    drop_named,
    error_response,
    forwarded_for,
    forwarded_host,
    header_class,
    parse_content_length,
    trace_context,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterSettings:
    """Limits of the router's client side."""

    max_header_bytes: int = 64 * 1024
    """Request line plus headers; more gets 431."""
    max_headers: int = 200
    """Header fields in one request; more gets 431."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Request body; more gets 413 (Cloud Run's limit for HTTP/1)."""
    client_idle_timeout: float = 60.0
    """Seconds a keep-alive connection may wait for its next request."""
    header_timeout: float = 10.0
    """Seconds to send a whole request head (cuts off slowloris clients)."""
    max_client_connections: int = 10_000
    """Open client connections; more are answered 503 and closed."""
    server_name: str = "cloudlet"
    """The ``Server`` header of the router's own responses."""


PIPELINE = 4
STOPPED = 8
_SPECIALS = 14
_RAW_HEAD_SLACK = 64 * 1024
_HEAD = (
    b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: %s\r\nForwarded: %s\r\n%s\r\n"
)
_HEAD_FRESH_TRACE = (
    b"%s %s HTTP/1.1\r\nHost: %s\r\n%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: %s\r\nForwarded: %s\r\n" + FRESH_TRACE + b"\r\n"
)
"""The request head of the common case: no body, new trace ids."""
_CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"
_NO_BODY: tuple[bool, bool, int, tuple[int, str] | None] = (False, False, -1, None)
_MANY_LINES = 4 * 100
"""Above this many header pieces, count the fields exactly."""


_LISTS = frozenset({X_FORWARDED_FOR, FORWARDED, CONNECTION, TRANSFER_ENCODING})
"""Headers whose repeated fields join into one list."""
_SINGLE = frozenset({CONTENT_LENGTH, HOST})
"""Headers that must not repeat."""


def _nowhere(data: Iterable[bytes]) -> None:
    """Where writes go before the connection is made."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing the rest of the data."""


class RouterProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_active",
        "_broken",
        "_closed",
        "_eof",
        "_fail",
        "_fwd_element",
        "_fwd_host",
        "_ip_bytes",
        "_lines",
        "_lingering",
        "_max_head_bytes",
        "_parsing",
        "_pending",
        "_raw_head",
        "_raw_head_limit",
        "_read_blocks",
        "_reading_head",
        "_seq",
        "_special",
        "_unusual",
        "_url",
        "closing",
        "ip",
        "parser",
        "router",
        "settings",
        "sweep_key",
        "sweep_since",
        "table",
        "transport",
        "write_paused",
        "writelines",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
        self.settings = router.settings
        self.table = router.table
        self.transport: asyncio.Transport | None = None
        self.writelines: Callable[[Iterable[bytes]], None] = _nowhere
        self.parser = HttpRequestParser(self)
        self.ip = ""
        self._ip_bytes = b""
        self._fwd_host = b""
        self._fwd_element = b""
        self._active: Exchange | None = None
        self._pending: deque[Exchange] = deque()
        self._parsing: Exchange | None = None
        self._read_blocks = 0
        self.write_paused = False
        self.closing = False
        """Close once the current response is out."""
        self._closed = False
        self._broken = False
        self._eof = False
        self._lingering = False
        self._reading_head = True
        self._seq = 0
        self._raw_head = 0
        self.sweep_key = -1
        self.sweep_since = 0.0
        self._url = b""
        self._lines: list[bytes] = []
        self._special: list[bytes | None] = [None] * _SPECIALS
        self._unusual = False
        self._max_head_bytes = self.settings.max_header_bytes
        self._raw_head_limit = self.settings.max_header_bytes + _RAW_HEAD_SLACK
        self._fail: tuple[int, str] | None = None

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.writelines = self.transport.writelines
        """The transport's own: writes after a close are dropped, as the exchange ends."""
        connections = self.router.connections
        connections.add(self)
        if len(connections) > self.settings.max_client_connections:
            self._broken = True
            message = "the router has too many open connections; retry later"
            self.transport.write(self._error_bytes(503, message, close=True))
            self.transport.close()
            return
        peer = transport.get_extra_info("peername")
        self.ip = str(peer[0]) if isinstance(peer, tuple) else ""
        self._ip_bytes = self.ip.encode()

    def data_received(self, data: bytes) -> None:
        if self._broken:
            return
        if self._parsing is None:  # these bytes start or continue a request head
            if not self._reading_head:
                self._reading_head = True
                self._seq += 1
            self._raw_head += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self.stop_reading()  # no protocol switch: the request is served as plain HTTP
            return
        except HttpParserError as exc:
            if not self._broken:
                self._protocol_error(*(self._fail or (400, f"malformed request: {exc}")))
            return
        if self._reading_head and self._raw_head > self._raw_head_limit:
            self._protocol_error(431, self._head_too_large())

    def eof_received(self) -> bool:
        self._eof = True
        parsing = self._parsing
        if parsing is not None and not parsing.req_done:
            return False  # the client gave up mid-request
        return self._active is not None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._broken = True
        self.router.connections.discard(self)
        active = self._active
        self._active = None
        self._pending.clear()
        self._parsing = None
        if active is not None:
            active.client_gone()

    def pause_writing(self) -> None:
        self.write_paused = True
        active = self._active
        if active is not None and active.upstream is not None:
            active.upstream.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        active = self._active
        if active is not None and active.upstream is not None:
            active.upstream.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        cls = SEEN_NAMES.get(name)
        if cls is None:
            cls = header_class(name)
        if not cls:
            self._lines += (name, b": ", value, CRLF)
        elif cls == HOST and self._special[HOST] is None:
            self._special[HOST] = value
        else:
            self._special_header(cls, name, value)

    def _special_header(self, cls: int, name: bytes, value: bytes) -> None:
        if cls >= AUTHORIZATION:  # passed on as they are, and noted
            self._lines += (name, b": ", value, CRLF)
        else:
            self._unusual = True
        special = self._special
        known = special[cls]
        if known is None:
            special[cls] = value
        elif cls in _LISTS:
            special[cls] = known + b", " + value
        elif cls in _SINGLE:
            self._fail = (400, f"the request has more than one {name.decode('latin-1')} header")
            raise _StopParsing

    def on_headers_complete(self) -> None:
        if self._broken:
            raise _StopParsing  # answer nothing more on this connection
        self._reading_head = False
        if self._raw_head > self._max_head_bytes or len(self._lines) > _MANY_LINES:
            self._check_head_size()
        self._raw_head = 0
        special = self._special
        self._special = [None] * _SPECIALS
        lines = self._lines
        self._lines = []
        url = self._url
        self._url = b""
        parser = self.parser
        keep_alive = parser.should_keep_alive()
        t0 = time.monotonic() if self.table.on_request_done is not None else 0.0
        if self._unusual:
            self._unusual = False
            exchange = self._unusual_request(special, lines, url, keep_alive, t0)
        else:
            # no body and no Connection, Expect, forwarding or trace headers: the common case,
            # kept short. Without a Connection header, keep-alive means HTTP/1.1.
            method = parser.get_method()
            exchange = Exchange(
                self, method, url, keep_alive and not self.closing, keep_alive, False, t0
            )
            endpoint = self._resolve(exchange, special)
            if endpoint is not None and method != b"CONNECT":
                host = special[HOST]
                assert host is not None
                exchange.endpoint = endpoint
                if special[USER_AGENT] is not None:
                    exchange.user_agent = special[USER_AGENT]
                if host != self._fwd_host:
                    self._cache_forwarded(host)
                bits = self.router.random_bits(192)
                trace_id = (bits >> 64) or 1
                span_id = (bits & SPAN_MASK) or 1
                exchange.trace_id = trace_id
                exchange.head = _HEAD_FRESH_TRACE % (
                    method,
                    url,
                    host,
                    b"".join(lines),
                    self._ip_bytes,
                    host,
                    self._fwd_element,
                    trace_id,
                    span_id,
                    trace_id,
                    span_id,
                )
            elif endpoint is not None:
                exchange.error = (405, "CONNECT is not supported")
        if self._active is not None:
            self._pending.append(exchange)
            self.block_reading(PIPELINE)
        elif exchange.endpoint is not None and not exchange.expect_continue:
            self._active = exchange  # exchange.start(), inlined for the common case
            exchange.endpoint.submit(exchange)
        else:
            self._active = exchange
            exchange.start()

    def _unusual_request(
        self,
        special: list[bytes | None],
        lines: list[bytes],
        url: bytes,
        keep_alive: bool,
        t0: float,
    ) -> Exchange:
        """A request with a body, or headers that need more than the common path does."""
        parser = self.parser
        http11 = keep_alive if special[CONNECTION] is None else parser.get_http_version() == "1.1"
        te = special[TRANSFER_ENCODING]
        cl = special[CONTENT_LENGTH]
        if te is None and cl is None:
            body_expected, chunked, length, problem = _NO_BODY
        else:
            body_expected, chunked, length, problem = self._body_framing(te, cl)
        method = parser.get_method()
        keep_alive = keep_alive and not self.closing
        exchange = Exchange(self, method, url, keep_alive, http11, body_expected, t0)
        if body_expected:
            self._parsing = exchange
        if problem is not None:
            exchange.error = problem
            if problem[0] != 413:
                self.stop_reading()  # the framing is not to be trusted: no next request
        elif method == b"CONNECT":
            exchange.error = (405, "CONNECT is not supported")
        else:
            endpoint = self._resolve(exchange, special)
            if endpoint is not None:
                self._unusual_head(exchange, endpoint, special, lines, chunked, length)
        return exchange

    def _resolve(self, exchange: Exchange, special: list[bytes | None]) -> RevisionEndpoint | None:
        """The revision for the request, or None with ``exchange.error`` set."""
        host = special[HOST]
        if host is None:
            exchange.error = (400, "the request has no Host header")
            return None
        table = self.table
        resolved = table.resolve(host)
        if resolved is None:
            shown = host.decode("latin-1")[:200]
            exchange.error = (
                404,
                f"no service is deployed at {shown}; "
                "`cloudlet run services list` shows services and their URLs",
            )
            return None
        route, endpoint = resolved
        if not route.public or table.authorize is not None:
            refusal = table.refusal(route, special[AUTHORIZATION])
            if refusal is not None:
                exchange.error = refusal
                return None
        return endpoint

    def _cache_forwarded(self, host: bytes) -> None:
        """The RFC 7239 element for this client and host (the same for most requests on
        a connection, so it is made once)."""
        self._fwd_host = host
        self._fwd_element = b"%s;host=%s;proto=http" % (
            forwarded_for(self.ip),
            forwarded_host(host),
        )

    def _unusual_head(
        self,
        exchange: Exchange,
        endpoint: RevisionEndpoint,
        special: list[bytes | None],
        lines: list[bytes],
        chunked: bool,
        length: int,
    ) -> None:
        expect = special[EXPECT]
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                exchange.error = (417, "only `Expect: 100-continue` is supported")
                return
            exchange.expect_continue = True
        exchange.endpoint = endpoint
        exchange.chunked_in = chunked
        if special[USER_AGENT] is not None:
            exchange.user_agent = special[USER_AGENT]
        connection = special[CONNECTION]
        if connection is not None:
            named = connection_options(connection)[1]
            if named:
                lines = drop_named(lines, named)
        host = special[HOST]
        assert host is not None
        xff = special[X_FORWARDED_FOR]
        xff = xff + b", " + self._ip_bytes if xff else self._ip_bytes
        if host != self._fwd_host:
            self._cache_forwarded(host)
        forwarded = special[FORWARDED]
        forwarded = forwarded + b", " + self._fwd_element if forwarded else self._fwd_element
        if chunked:
            framing = _CHUNKED_LINE
        elif length >= 0:
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing = b""
        traceparent = special[TRACEPARENT]
        cloud_trace = special[CLOUD_TRACE]
        if traceparent is None and cloud_trace is None:
            bits = self.router.random_bits(192)
            trace_id = (bits >> 64) or 1
            span_id = (bits & SPAN_MASK) or 1
            exchange.trace_id = trace_id
            trace = FRESH_TRACE % (trace_id, span_id, trace_id, span_id)
        else:
            traceparent, cloud_trace, exchange.trace_id = trace_context(
                traceparent, cloud_trace, self.router.random_bits
            )
            trace = b"traceparent: %s\r\nX-Cloud-Trace-Context: %s\r\n" % (
                traceparent,
                cloud_trace,
            )
        exchange.head = _HEAD % (
            exchange.method,
            exchange.url,
            host,
            b"".join(lines),
            framing,
            xff,
            host,
            forwarded,
            trace,
        )

    def on_body(self, data: bytes) -> None:
        parsing = self._parsing
        if parsing is not None:
            parsing.request_body(data)

    def on_message_complete(self) -> None:
        parsing = self._parsing
        if parsing is not None:
            self._parsing = None
            # what follows in this read may be a head that data_received did not count:
            # have on_headers_complete measure it exactly
            self._raw_head = self._max_head_bytes + 1
            parsing.request_complete()

    # -- reading a request --------------------------------------------------------------------

    def _body_framing(
        self, te: bytes | None, cl: bytes | None
    ) -> tuple[bool, bool, int, tuple[int, str] | None]:
        """(body expected, chunked, content length or -1, problem)."""
        if te is not None:
            if cl is not None:
                problem = "both Content-Length and Transfer-Encoding: the body length is ambiguous"
                return False, False, -1, (400, problem)
            if te.strip().lower() != b"chunked":
                return False, False, -1, (501, "only the chunked transfer coding is supported")
            return True, True, -1, None
        assert cl is not None
        length = parse_content_length(cl)
        if length is None:
            return False, False, -1, (400, "Content-Length is not a number")
        limit = self.settings.max_body_bytes
        if length > limit:
            problem = f"the request body of {length} bytes is over the limit of {limit} bytes"
            return True, False, length, (413, problem)
        return length > 0, False, length, None

    def _check_head_size(self) -> None:
        """The exact size and field count of the head just read, when a cheap bound fails."""
        special_bytes = sum(len(value) for value in self._special if value is not None)
        size = len(self._url) + sum(map(len, self._lines)) + special_bytes
        # a repeated listed header (X-Forwarded-For, say) counts once here; the raw-bytes
        # bound in data_received still caps memory
        fields = len(self._lines) // 4 + sum(value is not None for value in self._special)
        if size > self.settings.max_header_bytes or fields > self.settings.max_headers:
            self._fail = (431, self._head_too_large())
            raise _StopParsing

    def _head_too_large(self) -> str:
        return (
            f"request head over the limit of {self.settings.max_header_bytes} bytes or "
            f"{self.settings.max_headers} header fields"
        )

    def _protocol_error(self, status: int, message: str) -> None:
        """A request that cannot be parsed: answer it in turn, then close."""
        self.stop_reading()
        parsing = self._parsing
        self._parsing = None
        if parsing is not None and not parsing.req_done:
            if parsing is self._active:
                parsing.fail(status, message)
            else:
                parsing.error = (status, message)
                parsing.req_done = True
            return
        exchange = Exchange(self, b"GET", self._url, False, True, False, 0.0)
        exchange.error = (status, message)
        self._enqueue(exchange)

    def _enqueue(self, exchange: Exchange) -> None:
        if self._active is None:
            self._active = exchange
            exchange.start()
        else:
            self._pending.append(exchange)
            self.block_reading(PIPELINE)

    # -- writing and flow control ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():  # uvloop raises on a closed transport
            transport.write(data)

    def write_all(self, data: list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            transport.writelines(data)

    def block_reading(self, reason: int) -> None:
        if not self._read_blocks and not self._closed:
            assert self.transport is not None
            self.transport.pause_reading()
        self._read_blocks |= reason

    def unblock_reading(self, reasons: int) -> None:
        if self._read_blocks & reasons:
            self._read_blocks &= ~reasons
            if not self._read_blocks and not self._closed:
                assert self.transport is not None
                self.transport.resume_reading()

    def stop_reading(self) -> None:
        """Parse nothing more on this connection; close it after the queued answers."""
        self._broken = True
        self.block_reading(STOPPED)

    # -- ending exchanges --------------------------------------------------------------------

    def send_error(self, exchange: Exchange, status: int, message: str) -> None:
        close = not exchange.keep_alive or not exchange.req_done or self.closing or self._broken
        data = self._error_bytes(status, message, close, exchange.method == b"HEAD")
        exchange.status = status
        exchange.resp_bytes = len(data)
        self.write(data)
        self.exchange_done(exchange, close)

    def _error_bytes(
        self, status: int, message: str, close: bool, head_only: bool = False
    ) -> bytes:
        return error_response(
            status, message, close=close, server=self.router.server_name, head_only=head_only
        )

    def exchange_done(self, exchange: Exchange, close: bool) -> None:
        """The response is out: record it, then serve the next request or close."""
        if self.table.on_request_done is not None:
            self._record(exchange)
        if exchange is not self._active:
            return
        self._active = None
        self.unblock_reading(UPSTREAM_FULL | BUFFERING)
        pending = self._pending
        if close or self.closing or (not pending and (self._broken or self._eof)):
            self._close(linger=not exchange.req_done)
            return
        if pending:
            following = pending.popleft()
            if not pending:
                self.unblock_reading(PIPELINE)
            self._active = following
            following.start()

    def abort(self, exchange: Exchange) -> None:
        """The response was cut short: reset the connection so the client sees it."""
        if self.table.on_request_done is not None:
            self._record(exchange)
        self._active = None
        self._broken = True
        if not self._closed:
            assert self.transport is not None
            self.transport.abort()

    def _close(self, linger: bool = False) -> None:
        """Close after the buffered output; with ``linger``, first read and discard what the
        client still sends for a while, so that it gets our answer rather than a reset."""
        self._broken = True
        self.closing = True
        if self._closed or self._lingering:
            return
        transport = self.transport
        assert transport is not None
        if linger and not self._eof and transport.can_write_eof():
            self._lingering = True
            self.sweep_key = -2
            transport.write_eof()
            self.unblock_reading(-1)
        else:
            transport.close()

    def _record(self, exchange: Exchange) -> None:
        hook = self.table.on_request_done
        assert hook is not None
        endpoint = exchange.endpoint
        backend = exchange.backend
        record = RequestRecord(
            service=endpoint.service if endpoint is not None else None,
            revision=endpoint.revision if endpoint is not None else None,
            backend=backend.id if backend is not None else None,
            method=exchange.method.decode("latin-1"),
            url=exchange.url.decode("latin-1"),
            status=exchange.status,
            latency=time.monotonic() - exchange.t0 if exchange.t0 else 0.0,
            request_bytes=exchange.req_bytes,
            response_bytes=exchange.resp_bytes,
            remote_ip=self.ip,
            user_agent=(
                exchange.user_agent.decode("latin-1") if exchange.user_agent is not None else None
            ),
            trace_id=_trace_text(exchange.trace_id),
        )
        try:
            hook(record)
        except Exception:
            log.exception("the request-done hook failed")

    # -- timeouts -----------------------------------------------------------------------------

    def check_timeouts(self, now: float, serving: bool) -> None:
        """The router's sweep: cut off slow request heads and idle connections."""
        if self._closed:
            return
        if self._lingering:
            if self.sweep_key == -3 or not serving:
                assert self.transport is not None
                self.transport.close()
            self.sweep_key = -3
            return
        if self._active is not None:
            self.sweep_key = -1
            if not serving:
                self.closing = True
            return
        if not serving:
            self._close()
            return
        key = self._seq * 2 + self._reading_head
        if key != self.sweep_key:
            self.sweep_key = key
            self.sweep_since = now
            return
        if self._reading_head:
            if now - self.sweep_since >= self.settings.header_timeout:
                self._header_timeout()
        elif now - self.sweep_since >= self.settings.client_idle_timeout:
            self._close()

    def _header_timeout(self) -> None:
        self._broken = True
        if self._seq or self._raw_head:
            message = f"the request head did not arrive within {self.settings.header_timeout:g}s"
            self.write(self._error_bytes(408, message, close=True))
        self._close()


def _trace_text(trace_id: bytes | int | None) -> str | None:
    if isinstance(trace_id, int):
        return f"{trace_id:032x}"
    return trace_id.decode() if trace_id is not None else None


class Router:
    """The router: a routing table served on a listening socket."""

    def __init__(
        self,
        table: RoutingTable,
        settings: RouterSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.table = table
        self.settings = settings or RouterSettings()
        self.server_name = self.settings.server_name.encode()
        self.connections: set[RouterProtocol] = set()
        self.random_bits = (rng or random.Random()).getrandbits
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(
            0.02, min(1.0, self.settings.header_timeout / 4, self.settings.client_idle_timeout / 4)
        )

    async def start(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: RouterProtocol(self), host, port, reuse_address=True, backlog=2048
        )
        self._sweeper = loop.call_later(self._tick, self._sweep)
        return self.server

    def _sweep(self) -> None:
        server = self.server
        serving = server is not None and server.is_serving()
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            conn.check_timeouts(now, serving)
        if serving or self.connections:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick, self._sweep)
        else:
            self._sweeper = None

    def close(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.check_timeouts(0.0, serving=False)

    async def aclose(self, grace: float = 10.0) -> None:
        """Close, wait up to ``grace`` seconds for responses in progress, then cut them."""
        self.close()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace
        while self.connections and loop.time() < give_up:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.server is not None:
            await self.server.wait_closed()


async def start_router(
    table: RoutingTable, host: str, port: int, settings: RouterSettings
) -> asyncio.Server:
    """Serve ``table`` on host:port. Closing the server also closes idle client connections
    (within one sweep tick); busy ones close after their response."""
    return await Router(table, settings).start(host, port)
