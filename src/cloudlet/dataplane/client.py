"""``RouterProtocol``: one client connection of the router.

It parses requests with httptools and answers them in order, one ``Exchange`` at a time
(pipelined requests wait their turn). The common request (no body, no Connection, Expect,
forwarding or trace headers, a public service, nothing else in progress) is handled inline
in ``on_headers_complete``, because this is the hottest code in Cloudlet: every attribute
read and call there costs throughput. Everything else goes through ``request``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

from cloudlet.dataplane.exchange import BUFFERING, UPSTREAM_FULL, Exchange
from cloudlet.dataplane.request import unusual_request
from cloudlet.dataplane.wire import (
    AUTHORIZATION,
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    FORWARDED,
    HOST,
    SEEN_NAMES,
    TRANSFER_ENCODING,
    USER_AGENT,
    X_FORWARDED_FOR,
    error_response,
    forwarded_for,
    forwarded_host,
    header_class,
    random_ids,
)

if TYPE_CHECKING:
    from cloudlet.dataplane.proxy import Router

log = logging.getLogger(__name__)

PIPELINE = 4
STOPPED = 8
_SPECIALS = 14
_RAW_HEAD_SLACK = 64 * 1024
_MANY_LINES = 100
"""Above this many header lines, count the fields exactly."""
_LISTS = frozenset({X_FORWARDED_FOR, FORWARDED, CONNECTION, TRANSFER_ENCODING})
"""Headers whose repeated fields join into one list."""
_SINGLE = frozenset({CONTENT_LENGTH, HOST})
"""Headers that must not repeat."""
_HEAD_FRESH_TRACE = (
    b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%straceparent: 00-%s-%s-01\r\n"
    b"X-Cloud-Trace-Context: %s/%d;o=1\r\n\r\n"
)
"""The request head of the common case: no body, new trace ids (hex, and the span id as a
number for Cloud Trace); the fifth field holds the forwarding headers."""
_TRACE_POOL = 64 * 48
"""Hex digits of random ids drawn at a time: a trace id (32) and a span id (16) each."""
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_FORWARDING = (
    b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\nForwarded: %s\r\n"
)


def _nowhere(data: object) -> None:
    """Where writes go before the connection is made."""


class _StopParsing(Exception):
    """Raised from a parser callback to stop parsing the rest of the data."""


class RouterProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_active",
        "_auth",
        "_broken",
        "_closed",
        "_eof",
        "_fail",
        "_fwd_block",
        "_fwd_element",
        "_fwd_host",
        "_host",
        "_lines",
        "_lingering",
        "_max_head_bytes",
        "_parsing",
        "_pending",
        "_random_bits",
        "_raw_head",
        "_raw_head_limit",
        "_read_blocks",
        "_reading_head",
        "_seq",
        "_special",
        "_traces",
        "_traces_at",
        "_ua",
        "_url",
        "closing",
        "ip",
        "ip_bytes",
        "parser",
        "router",
        "settings",
        "sweep_key",
        "sweep_since",
        "table",
        "transport",
        "write_bytes",
        "write_paused",
        "writelines",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
        self.settings = router.settings
        self.table = router.table
        self._random_bits = router.random_bits
        self.transport: asyncio.Transport | None = None
        self.writelines: Callable[[Iterable[bytes]], None] = _nowhere
        self.write_bytes: Callable[[bytes], None] = _nowhere
        self.parser = HttpRequestParser(self)
        self.ip = ""
        self.ip_bytes = b""
        self._fwd_host = b""
        self._fwd_element = b""
        self._fwd_block = b""
        self._traces = b""
        self._traces_at = 0
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
        self._host: bytes | None = None
        self._ua: bytes | None = None
        self._auth: bytes | None = None
        self._special: list[bytes | None] | None = None
        """The other special headers, when a request has any."""
        self._max_head_bytes = self.settings.max_header_bytes
        self._raw_head_limit = self.settings.max_header_bytes + _RAW_HEAD_SLACK
        self._fail: tuple[int, str] | None = None

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        # the transport's own: writes after a close are dropped, and the exchange ends
        self.writelines = self.transport.writelines
        self.write_bytes = self.transport.write
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
        self.ip_bytes = self.ip.encode()

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
        """The client sent all it will: answer what reached an instance (a client may
        half-close and still read), give up what still waits for a slot."""
        self._eof = True
        parsing = self._parsing
        if parsing is not None and not parsing.req_done:
            return False  # the client gave up mid-request
        active = self._active
        if active is None:
            return False
        return active.upstream is not None or active.connecting is not None

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
            self._lines.append(name + b": " + value + CRLF)  # no tuple: less for the GC
        elif cls == HOST and self._host is None:
            self._host = value
        else:
            self._special_header(cls, name, value)

    def _special_header(self, cls: int, name: bytes, value: bytes) -> None:
        if cls >= AUTHORIZATION:  # passed on as they are, and noted
            self._lines.append(name + b": " + value + CRLF)
            if cls == AUTHORIZATION:
                if self._auth is None:
                    self._auth = value
            elif self._ua is None:
                self._ua = value
            return
        if cls == HOST:
            self._fail = (400, "the request has more than one Host header")
            raise _StopParsing
        special = self._special
        if special is None:
            special = self._special = [None] * _SPECIALS
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
        lines = self._lines
        if self._raw_head > self._max_head_bytes or len(lines) > _MANY_LINES:
            self._check_head_size()
        self._raw_head = 0
        url = self._url
        self._url = b""
        host = self._host
        self._host = None
        parser = self.parser
        method = parser.get_method()
        keep_alive = parser.should_keep_alive()
        table = self.table
        entry = table.cache.get(host) if host is not None else None  # lookup's cache
        if entry is None and host is not None:
            entry = table.lookup(host)
        if (
            entry is None
            or host is None
            or self._special is not None
            or self._active is not None
            or self.closing
            or not entry.route.public
            or method == b"CONNECT"
        ):
            self._lines = []  # the general path keeps this one
            self._general_request(method, url, host, keep_alive, lines)
            return
        # The common path. Without a Connection header, keep-alive means HTTP/1.1.
        endpoint = entry.fixed or table.pick(entry)
        if host != self._fwd_host:
            self.forwarded_element(host)
        at = self._traces_at
        if at == 0:
            self._traces = b"%0*x" % (_TRACE_POOL, self._random_bits(_TRACE_POOL * 4))
            at = _TRACE_POOL
        at -= 48
        self._traces_at = at
        trace_id = self._traces[at : at + 32]
        span_id = self._traces[at + 32 : at + 48]
        if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
            trace_id, span_id = random_ids(self._random_bits(192))  # not zero
        exchange = Exchange(
            self,
            method,
            url,
            keep_alive,
            endpoint,
            _HEAD_FRESH_TRACE
            % (
                method,
                url,
                host,
                b"".join(lines) if lines else b"",
                self._fwd_block,
                trace_id,
                span_id,
                trace_id,
                int(span_id, 16),
            ),
        )
        if lines:
            lines.clear()  # reused: one allocation less per request
        exchange.trace_id = trace_id
        if self._ua is not None:
            exchange.user_agent = self._ua
            self._ua = None
        if self._auth is not None:
            self._auth = None
        if table.on_request_done is not None:
            exchange.t0 = time.monotonic()
        self._active = exchange
        endpoint.submit(exchange)

    def _general_request(
        self, method: bytes, url: bytes, host: bytes | None, keep_alive: bool, lines: list[bytes]
    ) -> None:
        special = self._special or [None] * _SPECIALS
        self._special = None
        special[HOST] = host
        special[USER_AGENT] = self._ua
        special[AUTHORIZATION] = self._auth
        self._ua = self._auth = None
        exchange = unusual_request(self, method, url, keep_alive, special, lines)
        if self.table.on_request_done is not None:
            exchange.t0 = time.monotonic()
        if not exchange.req_done:
            self._parsing = exchange
        if self._active is None:
            self._active = exchange
            exchange.start()
        else:
            self._pending.append(exchange)
            self.block_reading(PIPELINE)

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

    def forwarded_element(self, host: bytes) -> bytes:
        """The RFC 7239 element for this client and host (the same for most requests on a
        connection, so it is made once)."""
        if host != self._fwd_host:
            self._fwd_host = host
            self._fwd_element = b"%s;host=%s;proto=http" % (
                forwarded_for(self.ip),
                forwarded_host(host),
            )
            self._fwd_block = _FORWARDING % (self.ip_bytes, host, self._fwd_element)
        return self._fwd_element

    def _check_head_size(self) -> None:
        """The exact size and field count of the head just read, when a cheap bound fails."""
        specials = [self._host, self._ua, self._auth, *(self._special or ())]
        present = [value for value in specials if value is not None]
        size = len(self._url) + sum(map(len, self._lines)) + sum(map(len, present))
        # a repeated listed header (X-Forwarded-For, say) counts once here; the raw-bytes
        # bound in data_received still caps memory
        fields = len(self._lines) + len(present)
        if size > self._max_head_bytes or fields > self.settings.max_headers:
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
        exchange = Exchange(self, b"GET", self._url, False, None, b"")
        exchange.error = (status, message)
        if self._active is None:
            self._active = exchange
            exchange.start()
        else:
            self._pending.append(exchange)

    # -- writing and flow control ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():  # uvloop raises on a closed transport
            transport.write(data)

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
        hook = self.table.on_request_done
        if hook is not None:
            try:
                hook(exchange.record(self.ip))
            except Exception:
                log.exception("the request-done hook failed")
        if exchange is not self._active:
            return
        self._active = None
        if self._read_blocks:
            self.unblock_reading(UPSTREAM_FULL | BUFFERING)
        pending = self._pending
        if close or self.closing or (not pending and (self._broken or self._eof)):
            self._close(linger=not exchange.req_done)
        elif pending:
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
        try:
            hook(exchange.record(self.ip))
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
            # the client may still be sending: closing now would reset the connection
            # and could destroy the 408 before the client reads it
            self._close(linger=True)
            return
        self._close()
