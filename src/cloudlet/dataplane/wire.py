"""HTTP/1.1 wire details the proxy needs: header classes, framing, errors, trace context.

Pure functions and constants; the protocols in ``proxy`` and ``upstream`` call them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus

# Header classes. The first four are the ones a proxy must handle in responses too.
OTHER = 0
CONNECTION = 1
HOP_BY_HOP = 2
TRANSFER_ENCODING = 3
CONTENT_LENGTH = 4
HOST = 5
EXPECT = 6
X_FORWARDED_FOR = 7
X_FORWARDED_REPLACED = 8
FORWARDED = 9
TRACEPARENT = 10
CLOUD_TRACE = 11
AUTHORIZATION = 12
USER_AGENT = 13

_CLASSES = {
    b"connection": CONNECTION,
    b"keep-alive": HOP_BY_HOP,
    b"proxy-connection": HOP_BY_HOP,
    b"te": HOP_BY_HOP,
    b"trailer": HOP_BY_HOP,
    b"upgrade": HOP_BY_HOP,
    b"transfer-encoding": TRANSFER_ENCODING,
    b"content-length": CONTENT_LENGTH,
    b"host": HOST,
    b"expect": EXPECT,
    b"x-forwarded-for": X_FORWARDED_FOR,
    b"x-forwarded-proto": X_FORWARDED_REPLACED,
    b"x-forwarded-host": X_FORWARDED_REPLACED,
    b"forwarded": FORWARDED,
    b"traceparent": TRACEPARENT,
    b"x-cloud-trace-context": CLOUD_TRACE,
    b"authorization": AUTHORIZATION,
    b"user-agent": USER_AGENT,
}
_STANDARD_CONNECTION_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b"te"})
_SEEN_NAMES_LIMIT = 4096

SEEN_NAMES: dict[bytes, int] = {}
"""Header names as spelled on the wire → class; the hot path looks here first."""


def header_class(name: bytes) -> int:
    """The class of a header name in any case (OTHER for ordinary headers)."""
    cls = SEEN_NAMES.get(name)
    if cls is None:
        cls = _CLASSES.get(name.lower(), OTHER)
        if len(SEEN_NAMES) < _SEEN_NAMES_LIMIT:
            SEEN_NAMES[name] = cls
    return cls


def connection_options(value: bytes) -> tuple[bool, list[bytes]]:
    """(``close`` given, other header names it lists) for a Connection header value."""
    close = False
    named: list[bytes] = []
    for token in value.lower().split(b","):
        token = token.strip()
        if token == b"close":
            close = True
        elif token and token not in _STANDARD_CONNECTION_TOKENS:
            named.append(token)
    return close, named


def drop_named(lines: list[bytes], names: list[bytes]) -> list[bytes]:
    """``lines`` holds header lines (``name: value`` and CRLF); drop the named headers."""
    return [line for line in lines if line.split(b":", 1)[0].strip().lower() not in names]


def chunk_size_line(size: int) -> bytes:
    return b"%x\r\n" % size


CRLF = b"\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_response(
    status: int, message: str, *, close: bool, server: bytes, head_only: bool = False
) -> bytes:
    """A short plain-text response the router itself gives."""
    body = message.encode() + b"\n"
    head = b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n" % (
        status,
        reason_phrase(status),
    )
    head += b"Content-Length: %d\r\nServer: %s\r\n" % (len(body), server)
    if close:
        head += b"Connection: close\r\n"
    return head + CRLF if head_only else head + CRLF + body


STATUS_LINES: dict[int, bytes] = {}
"""Status lines already made, by status."""


def status_line(status: int) -> bytes:
    """``HTTP/1.1 200 OK`` and CRLF; the reason is ours (it carries no meaning)."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))
        if 100 <= status < 1000:
            STATUS_LINES[status] = line
    return line


def reason_phrase(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def parse_content_length(value: bytes) -> int | None:
    """The length, or None when it is not a plain decimal number."""
    value = value.strip()
    if not value.isdigit() or len(value) > 18:
        return None
    return int(value)


# -- forwarding headers ---------------------------------------------------------------------


def forwarded_for(ip: str) -> bytes:
    """The ``for=`` of RFC 7239: IPv6 addresses are bracketed and quoted."""
    return b'for="[%s]"' % ip.encode() if ":" in ip else b"for=" + ip.encode()


def forwarded_host(host: bytes) -> bytes:
    """``host=`` takes a token; a port's colon makes it a quoted string."""
    if _TOKEN.fullmatch(host):
        return host
    return b'"' + host.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

# -- trace context --------------------------------------------------------------------------

_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_CLOUD_TRACE = re.compile(rb"([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


def trace_context(
    traceparent: bytes | None,
    cloud_trace: bytes | None,
    random_bits: Callable[[int], int],
) -> tuple[bytes, bytes, bytes]:
    """(traceparent, X-Cloud-Trace-Context, trace id) to send upstream.

    A valid incoming ``traceparent`` is kept; else one comes from an incoming
    ``X-Cloud-Trace-Context``; else from ``random_bits(192)``. The Cloud Trace header is
    the incoming one when given, else derived from the same trace id. (The proxy makes
    fresh ids itself when neither header came: see ``FRESH_TRACE``.)
    """
    parsed = _valid_traceparent(traceparent) if traceparent is not None else None
    if parsed is not None:
        trace_id, span_id = parsed
        header = traceparent
    else:
        ids = _from_cloud_trace(cloud_trace) if cloud_trace is not None else None
        trace_id, span_id = ids or random_ids(random_bits(192))
        header = b"00-%s-%s-01" % (trace_id, span_id)
    assert header is not None
    if cloud_trace is None:
        cloud_trace = b"%s/%d;o=1" % (trace_id, int(span_id, 16))
    return header, cloud_trace, trace_id


def _valid_traceparent(value: bytes) -> tuple[bytes, bytes] | None:
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version, trace_id, span_id, _ = match.groups()
    if version == b"ff" or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id


def _from_cloud_trace(value: bytes) -> tuple[bytes, bytes] | None:
    match = _CLOUD_TRACE.fullmatch(value.strip())
    if match is None:
        return None
    trace_id = match.group(1).lower()
    span = int(match.group(2) or b"0")
    if trace_id == _ZERO_TRACE or not 0 < span < 1 << 64:
        return None
    return trace_id, b"%016x" % span


def random_ids(bits: int) -> tuple[bytes, bytes]:
    """A trace id (32 hex digits) and a span id (16) from 192 random bits, neither zero."""
    return b"%032x" % ((bits >> 64) or 1), b"%016x" % ((bits & SPAN_MASK) or 1)


SPAN_MASK = (1 << 64) - 1
FRESH_TRACE = b"traceparent: 00-%032x-%016x-01\r\nX-Cloud-Trace-Context: %032x/%d;o=1\r\n"
"""Both trace headers from a new trace id and span id (ints), in one format."""


# -- responses that pass as they are --------------------------------------------------------

_HEAD_END = b"\r\n\r\n"
_LENGTH_MARK = b"\r\ncontent-length:"
_NEEDS_PARSER = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-conn|trailer|upgrade|transfer-enc|te[ \t]*:)"
    rb"|\n[ \t]"
)
"""Hop-by-hop or framing headers (names matched as prefixes: a false match only costs the
slower path), or a folded header line."""
_PASSING_LIMIT = 1024

PASSING: dict[bytes, int] = {}
"""Response heads already judged by ``passable`` → its verdict; most instances send the
same few heads over and over."""


def whole_response(data: bytes) -> int:
    """``body length << 10 | status`` when ``data`` is exactly one complete response that
    may pass to the client byte for byte (see ``passable``), else -1."""
    end = data.find(_HEAD_END)
    if end < 0:
        return -1
    head = data[:end]
    verdict = PASSING.get(head)
    if verdict is None:
        verdict = passable(head)
        if len(PASSING) >= _PASSING_LIMIT:
            PASSING.clear()
        PASSING[head] = verdict
    return verdict if verdict >> 10 == len(data) - end - 4 else -1


def passable(head: bytes) -> int:
    """``body length << 10 | status`` when ``head`` (without its final empty line) is that
    of a keep-alive HTTP/1.1 response, 200 to 599 but not 204 or 304, framed by a single
    Content-Length, with no hop-by-hop header and CRLF line ends only; else -1."""
    if not head.startswith(b"HTTP/1.1 ") or len(head) < 12:
        return -1
    status = head[9:12]
    if not status.isdigit() or head[12:13] not in (b" ", b"\r", b""):
        return -1
    if not b"200" <= status <= b"599" or status == b"204" or status == b"304":
        return -1
    lower = head.lower()
    at = lower.find(_LENGTH_MARK)
    if at < 0 or _NEEDS_PARSER.search(lower) is not None:
        return -1
    start = at + len(_LENGTH_MARK)
    stop = lower.find(b"\r\n", start)
    value = (lower[start:stop] if stop >= 0 else lower[start:]).strip(b" \t")
    if (
        not value.isdigit()
        or len(value) > 15
        or lower.find(_LENGTH_MARK, start) >= 0
        or lower.count(b"\n") != lower.count(b"\r\n")
        or lower.count(b"\r") != lower.count(b"\n")
    ):
        return -1
    return int(value) << 10 | int(status)
