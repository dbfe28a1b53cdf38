"""Requests off the common path: bodies, odd framing, forwarding and trace headers that
came with the request, refusals. Slower than the inlined common path, and complete.

``unusual_request`` turns a parsed request head into an ``Exchange``, either ready to be
proxied (``endpoint`` and ``head`` set) or carrying the ``error`` to answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.exchange import Exchange
from cloudlet.dataplane.wire import (
    AUTHORIZATION,
    CLOUD_TRACE,
    CONNECTION,
    CONTENT_LENGTH,
    EXPECT,
    FORWARDED,
    FRESH_TRACE,
    HOST,
    SPAN_MASK,
    TRACEPARENT,
    TRANSFER_ENCODING,
    USER_AGENT,
    X_FORWARDED_FOR,
    connection_options,
    drop_named,
    parse_content_length,
    trace_context,
)

if TYPE_CHECKING:
    from cloudlet.dataplane.client import RouterProtocol

Problem = tuple[int, str]

HEAD = (
    b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%sX-Forwarded-For: %s\r\nX-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: %s\r\nForwarded: %s\r\n%s\r\n"
)
"""A request head as sent upstream; the last field holds both trace headers."""
_CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"


def body_framing(
    te: bytes | None, cl: bytes | None, max_body: int
) -> tuple[bool, bool, int, Problem | None]:
    """(body expected, chunked, content length or -1, problem) from the framing headers."""
    if te is not None:
        if cl is not None:
            problem = "both Content-Length and Transfer-Encoding: the body length is ambiguous"
            return False, False, -1, (400, problem)
        if te.strip().lower() != b"chunked":
            return False, False, -1, (501, "only the chunked transfer coding is supported")
        return True, True, -1, None
    if cl is None:
        return False, False, -1, None
    length = parse_content_length(cl)
    if length is None:
        return False, False, -1, (400, "Content-Length is not a number")
    if length > max_body:
        problem = f"the request body of {length} bytes is over the limit of {max_body} bytes"
        return True, False, length, (413, problem)
    return length > 0, False, length, None


def resolve(
    client: RouterProtocol, host: bytes | None, auth: bytes | None
) -> RevisionEndpoint | Problem:
    """The revision for the Host header, or the refusal to answer."""
    if host is None:
        return 400, "the request has no Host header"
    table = client.table
    resolved = table.resolve(host)
    if resolved is None:
        shown = host.decode("latin-1")[:200]
        return (
            404,
            f"no service is deployed at {shown}; "
            "`cloudlet run services list` shows services and their URLs",
        )
    route, endpoint = resolved
    refusal = table.refusal(route, auth, client.ip)
    return endpoint if refusal is None else refusal


def unusual_request(
    client: RouterProtocol,
    method: bytes,
    url: bytes,
    keep_alive: bool,
    special: list[bytes | None],
    lines: list[bytes],
) -> Exchange:
    """The exchange for a request the common path does not take."""
    http11 = (
        keep_alive if special[CONNECTION] is None else client.parser.get_http_version() == "1.1"
    )
    body_expected, chunked, length, problem = body_framing(
        special[TRANSFER_ENCODING], special[CONTENT_LENGTH], client.settings.max_body_bytes
    )
    exchange = Exchange(client, method, url, keep_alive and not client.closing, None, b"")
    exchange.http11 = http11
    exchange.plain = False  # its response takes the general path too
    if body_expected:
        exchange.expect_body()
    exchange.user_agent = special[USER_AGENT]
    if problem is not None:
        exchange.error = problem
        if problem[0] != 413:
            client.stop_reading()  # the framing is not to be trusted: no next request
        return exchange
    if method == b"CONNECT":
        exchange.error = (405, "CONNECT is not supported")
        return exchange
    resolved = resolve(client, special[HOST], special[AUTHORIZATION])
    if isinstance(resolved, tuple):
        exchange.error = resolved
        return exchange
    expect = special[EXPECT]
    if expect is not None:
        if expect.strip().lower() != b"100-continue":
            exchange.error = (417, "only `Expect: 100-continue` is supported")
            return exchange
        exchange.expect_continue = True
    exchange.endpoint = resolved
    exchange.chunked_in = chunked
    exchange.head = _head(client, exchange, special, lines, chunked, length)
    return exchange


def _head(
    client: RouterProtocol,
    exchange: Exchange,
    special: list[bytes | None],
    lines: list[bytes],
    chunked: bool,
    length: int,
) -> bytes:
    connection = special[CONNECTION]
    if connection is not None:
        named = connection_options(connection)[1]
        if named:
            lines = drop_named(lines, named)
    host = special[HOST]
    assert host is not None
    xff = special[X_FORWARDED_FOR]
    xff = xff + b", " + client.ip_bytes if xff else client.ip_bytes
    element = client.forwarded_element(host)
    forwarded = special[FORWARDED]
    forwarded = forwarded + b", " + element if forwarded else element
    if chunked:
        framing = _CHUNKED_LINE
    elif length >= 0:
        framing = b"Content-Length: %d\r\n" % length
    else:
        framing = b""
    traceparent = special[TRACEPARENT]
    cloud_trace = special[CLOUD_TRACE]
    random_bits = client.router.random_bits
    if traceparent is None and cloud_trace is None:
        bits = random_bits(192)
        trace_id = (bits >> 64) or 1
        span_id = (bits & SPAN_MASK) or 1
        exchange.trace_id = trace_id
        trace = FRESH_TRACE % (trace_id, span_id, trace_id, span_id)
    else:
        traceparent, cloud_trace, exchange.trace_id = trace_context(
            traceparent, cloud_trace, random_bits
        )
        trace = b"traceparent: %s\r\nX-Cloud-Trace-Context: %s\r\n" % (traceparent, cloud_trace)
    return HEAD % (
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
