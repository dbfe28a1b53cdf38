"""Hostile bytes at a real router over real sockets: it answers or closes, never crashes,
and a bystander's keep-alive connection keeps working. Bounded budget (hypothesis)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlet.dataplane import RouterSettings
from tests.integration.dataplane_helpers import Env, router_env

HOST = b"hello.run.test"
EXAMPLES = 150
ALLOWED = {200, 400, 404, 405, 408, 411, 413, 414, 417, 431, 501, 502, 503, 505}


class Harness:
    """A router and one upstream on their own event loop, in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._env_cm = router_env(RouterSettings(header_timeout=2.0, client_idle_timeout=2.0))
        self.env: Env = self._run(self._env_cm.__aenter__())
        self._run(self._serve())

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _serve(self) -> None:
        upstream = await self.env.upstream()
        self.env.endpoint().add_backend("i1", "127.0.0.1", upstream.port)

    @property
    def port(self) -> int:
        return self.env.port

    def close(self) -> None:
        self._run(self._env_cm.__aexit__(None, None, None))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    made = Harness()
    try:
        yield made
    finally:
        made.close()


def exchange(port: int, data: bytes) -> bytes:
    """Send, half-close, read what comes back until the router closes (5 s at most)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(ConnectionError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def healthy(sock: socket.socket) -> bool:
    """One request on a bystander's kept-alive connection gets its 200."""
    sock.sendall(b"GET /echo HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(65536)
    length = int(
        next(
            line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        ).split(b":")[1]
    )
    body = head.split(b"\r\n\r\n", 1)[1]
    while len(body) < length:
        body += sock.recv(65536)
    return head.startswith(b"HTTP/1.1 200 ")


token = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC-_0123456789", min_size=1, max_size=12)
junk = st.binary(max_size=64)
header_value = st.one_of(
    st.sampled_from(
        [b"0", b"5", b"-1", b"+5", b"5, 5", b"chunked", b"gzip, chunked", b"", b"\x00"]
    ),
    junk,
)
header = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                b"Content-Length",
                b"Transfer-Encoding",
                b"Host",
                b"Connection",
                b"Expect",
                b"Upgrade",
                b"TE",
                b"Keep-Alive",
                b"Authorization",
            ]
        ),
        header_value,
    ),
    st.tuples(token.map(str.encode), junk),
    st.tuples(st.binary(min_size=1, max_size=20), junk),
)
chunked_body = st.lists(
    st.one_of(
        st.binary(max_size=20).map(lambda b: b"%x\r\n%s\r\n" % (len(b), b)),
        st.sampled_from([b"zz\r\n", b"ffffffffffffffffff\r\n", b"0\r\n\r\n", b"-1\r\n", b"\r\n"]),
    ),
    max_size=5,
).map(b"".join)
request = st.builds(
    lambda method, target, version, host, headers, body: (
        method + b" " + target + b" " + version + b"\r\n"
        + (b"Host: " + HOST + b"\r\n" if host else b"")
        + b"".join(name + b": " + value + b"\r\n" for name, value in headers)
        + b"\r\n" + body
    ),
    st.one_of(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT", b"OPTIONS"]), junk),
    st.one_of(st.sampled_from([b"/echo", b"/", b"*", b"http://x/", b"/%00", b"//"]), junk),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b""]),
    st.booleans(),
    st.lists(header, max_size=6),
    st.one_of(st.binary(max_size=100), chunked_body),
)  # fmt: skip
hostile = st.one_of(
    request, st.binary(max_size=300), st.lists(request, min_size=2, max_size=3).map(b"".join)
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=hostile)
def test_malformed_requests_get_an_answer_or_a_close_and_never_hurt_others(
    harness: Harness, data: bytes
) -> None:
    with socket.create_connection(("127.0.0.1", harness.port), timeout=5) as bystander:
        answer = exchange(harness.port, data)
        if answer:
            assert answer.startswith(b"HTTP/1.1 "), answer[:80]
            assert int(answer[9:12]) in ALLOWED, answer[:200]
        assert healthy(bystander)
