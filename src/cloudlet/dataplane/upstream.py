"""One keep-alive connection from the router to an instance, and how one is opened.

The connection parses responses with httptools and builds what goes to the client in
``out`` (the head first, then body pieces framed for the client), which is written once per
read. The exchange attached to it decides the framing (unless the common case settles it
here) and what happens when the response ends; between requests the connection sits in its
backend's idle pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from cloudlet.dataplane.activator import Backend
from cloudlet.dataplane.wire import (
    CONNECTION,
    CONTENT_LENGTH,
    CRLF,
    LAST_CHUNK,
    PASSING,
    SEEN_NAMES,
    STATUS_LINES,
    TRANSFER_ENCODING,
    chunk_size_line,
    connection_options,
    drop_named,
    header_class,
    status_line,
    whole_response,
)

_HEAD_END = b"\r\n\r\n"

if TYPE_CHECKING:
    from cloudlet.dataplane.exchange import Exchange

# What the response head said (bits of ``_head_flags``).
HAS_LENGTH = 1
CHUNKED_IN = 2
NAMES_HOPS = 4
"""A Connection header names more headers to drop."""

# Where the current response is (``phase``).
WAITING = 0
"""No byte of the response yet."""
READING = 1
HEAD_SEEN = 2
DONE = 3

# How the response body is framed toward the client.
RAW = 0
"""As received: a Content-Length body, or one delimited by closing the connection."""
CHUNKED = 1
NO_BODY = 2


_JOIN_BELOW = 16 * 1024
"""A response smaller than this is joined into one buffer before it is written."""


def _nowhere(data: object) -> None:
    """The client writer of a connection no exchange is attached to."""


class _ExtraResponse(Exception):
    """The instance sent a response nobody asked for."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_connection_named",
        "_framing",
        "_head_flags",
        "_keep_alive",
        "backend",
        "closed",
        "exchange",
        "no_body",
        "out",
        "parser",
        "phase",
        "pooled",
        "reading_paused",
        "resp_bytes",
        "transport",
        "write_client",
        "write_client_bytes",
    )

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.write_client: Callable[[list[bytes]], None] = _nowhere
        """Writes to the client of the attached exchange."""
        self.write_client_bytes: Callable[[bytes], None] = _nowhere
        self.pooled = False
        """Whether it sat idle in the pool (the instance may have closed it meanwhile)."""
        self.closed = False
        self.reading_paused = False
        self.no_body = False
        self._keep_alive = False
        self._framing = RAW
        self._connection_named: list[bytes] = []
        self._reset()

    def _reset(self) -> None:
        self.phase = WAITING
        self.out: list[bytes] = [b""]  # [0] becomes the status line
        self.resp_bytes = 0
        self._head_flags = 0

    # -- the exchange's side ------------------------------------------------------------------

    def attach(
        self,
        exchange: Exchange,
        write_client: Callable[[list[bytes]], None],
        write_client_bytes: Callable[[bytes], None],
        head_request: bool,
    ) -> None:
        self.exchange = exchange
        self.write_client = write_client
        self.write_client_bytes = write_client_bytes
        self.no_body = head_request

    def write(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():  # else connection_lost follows and tells the exchange
            transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():
            transport.writelines(data)

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()

    def close(self) -> None:
        """Drop the connection (the exchange, if any, is not told)."""
        self.exchange = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    def recycle(self) -> None:
        """Ready for the next request: back to the idle pool, or closed if not wanted."""
        self.exchange = None
        self.write_client = _nowhere
        self.pooled = True
        if self.reading_paused:
            self.resume_reading()
        if self.no_body:
            self.no_body = False
            self.parser = HttpResponseParser(self)  # it still waits for the HEAD body
        self.phase = WAITING  # _reset, inlined for the hot path
        out = self.out  # reused: one allocation less per request
        out.clear()
        out.append(b"")
        self.resp_bytes = 0
        self._head_flags = 0
        backend = self.backend
        if backend.draining or self.closed:
            self.close()
        else:
            backend.idle.append(self)

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        if self.phase == WAITING:
            if exchange.plain and not exchange.client.closing:
                # the common case: one whole response that passes as it is (the cache
                # lookup of whole_response, inlined)
                end = data.find(_HEAD_END)
                passing = PASSING.get(data[:end]) if end > 0 else -1
                if passing is None:
                    passing = whole_response(data)
                elif passing >> 10 != len(data) - end - 4:
                    passing = -1
                if passing >= 0:
                    self.write_client_bytes(data)
                    self._passed(exchange, passing)
                    return
            self.phase = READING
        try:
            self.parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:
            if self.exchange is exchange:
                self._parse_failed(exchange, exc)
            return
        if self.exchange is not exchange:
            return  # the exchange let go of us while handling the data
        if self.phase == DONE:
            out = self.out
            if self._framing == CHUNKED:
                out.append(LAST_CHUNK)
            if self.resp_bytes < _JOIN_BELOW:  # one buffer: uvloop's quickest write
                self.write_client_bytes(b"".join(out))
            else:
                self.write_client(out)
            exchange.response_done(self, self._keep_alive)
        elif self.phase == HEAD_SEEN and self.out:
            self.write_client(self.out)
            self.out.clear()

    def _passed(self, exchange: Exchange, passing: int) -> None:
        """A response passed whole: ``response_done`` and ``recycle``, inlined."""
        exchange.finished = exchange.started = True
        exchange.upstream = None
        exchange.resp_bytes = passing >> 10
        exchange.status = passing & 1023
        self.exchange = None
        self.write_client = _nowhere
        self.pooled = True
        if self.reading_paused:
            self.resume_reading()
        backend = self.backend
        if backend.draining or self.closed:
            self.close()
        else:
            backend.idle.append(self)
        endpoint = exchange.endpoint
        assert endpoint is not None
        endpoint.finish(exchange)
        exchange.client.exchange_done(exchange, exchange.close_after)

    def _complete(self, exchange: Exchange, reusable: bool) -> None:
        out = self.out
        if self._framing == CHUNKED:
            out.append(LAST_CHUNK)
        self.write_client(out)
        exchange.response_done(self, reusable)

    def _parse_failed(self, exchange: Exchange, exc: Exception) -> None:
        if self.phase == DONE:  # a complete response, then junk: serve it, drop the connection
            self._complete(exchange, reusable=False)
            return
        self.exchange = None
        self.close()
        exchange.upstream_lost(self, f"sent an invalid HTTP response ({exc})")

    def eof_received(self) -> bool:
        if self.exchange is None:  # leave the pool now, not only at connection_lost
            self.closed = True
            with contextlib.suppress(ValueError):
                self.backend.idle.remove(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        exchange = self.exchange
        if exchange is None:
            with contextlib.suppress(ValueError):
                self.backend.idle.remove(self)
            return
        phase = self.phase
        if phase == DONE or (
            phase == HEAD_SEEN and not self._head_flags & (HAS_LENGTH | CHUNKED_IN)
        ):
            self._complete(exchange, reusable=False)  # a body delimited by the close
            return
        self.exchange = None
        reason = f" ({exc})" if exc is not None else ""
        exchange.upstream_lost(
            self, "closed the connection before the response was complete" + reason
        )

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.upstream_paused(False)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        cls = SEEN_NAMES.get(name)
        if cls is None:
            cls = header_class(name)
        if not cls:
            self.out.append(name + b": " + value + CRLF)  # no tuple: less for the GC
        elif cls > TRANSFER_ENCODING:
            self.out.append(name + b": " + value + CRLF)
            if cls == CONTENT_LENGTH:
                self._head_flags |= HAS_LENGTH
        elif cls == TRANSFER_ENCODING:
            if value.lower().rstrip().endswith(b"chunked"):  # we frame anew
                self._head_flags |= CHUNKED_IN
        elif cls == CONNECTION:
            named = connection_options(value)[1]
            if named:
                if not self._head_flags & NAMES_HOPS:
                    self._connection_named = []
                self._head_flags |= NAMES_HOPS
                self._connection_named += named
        # other hop-by-hop headers are dropped

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:  # interim responses are not passed on
            self.out = [b""]
            self._head_flags = 0
            return
        if self.phase == DONE:
            raise _ExtraResponse
        self.phase = HEAD_SEEN
        self._keep_alive = parser.should_keep_alive()
        out = self.out
        if self._head_flags & NAMES_HOPS:
            out = self.out = [b"", *drop_named(out[1:], self._connection_named)]
        out[0] = STATUS_LINES.get(status) or status_line(status)
        exchange = self.exchange
        assert exchange is not None
        if (
            self._head_flags == HAS_LENGTH
            and exchange.plain
            and status != 204
            and status != 304
            and not exchange.client.closing
        ):  # the common case: the head passes as it is
            out.append(CRLF)
            self._framing = RAW
            exchange.status = status
            exchange.started = True
            endpoint = exchange.endpoint
            assert endpoint is not None
            endpoint.started(exchange)
        else:
            self._framing = exchange.response_head(status, out, self._head_flags & HAS_LENGTH)
        if self.no_body:
            self.phase = DONE

    def on_body(self, data: bytes) -> None:
        self.resp_bytes += len(data)
        framing = self._framing
        if framing == RAW:
            self.out.append(data)
        elif framing == CHUNKED:
            self.out += (chunk_size_line(len(data)), data, CRLF)

    def on_message_complete(self) -> None:
        if self.phase == HEAD_SEEN:  # not after an interim response
            self.phase = DONE


def connect(
    backend: Backend,
    done: Callable[[asyncio.Task[tuple[asyncio.Transport, UpstreamConnection]]], None],
) -> asyncio.Task[tuple[asyncio.Transport, UpstreamConnection]]:
    """Open a new connection to the instance; ``done`` gets the finished task."""
    loop = asyncio.get_running_loop()
    task = loop.create_task(
        loop.create_connection(lambda: UpstreamConnection(backend), backend.host, backend.port)
    )
    task.add_done_callback(done)
    return task
