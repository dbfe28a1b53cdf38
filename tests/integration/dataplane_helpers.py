"""Test doubles for the data plane: small HTTP/1.1 servers playing container instances,
a raw-socket client, and a harness that wires a router to them on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx

from cloudlet.dataplane import (
    RevisionEndpoint,
    Router,
    RouterSettings,
    RoutingTable,
    ServiceRoute,
)

DOMAIN = "run.test"
CHUNK = 64 * 1024


@dataclass
class Received:
    """A request as an upstream saw it."""

    method: str
    path: str
    headers: list[tuple[str, str]]
    body_bytes: int

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Upstream:
    """A small HTTP/1.1 server standing in for one container instance.

    Paths: ``/echo`` (the request as JSON), ``/sleep/S``, ``/hold`` (until ``release``),
    ``/bytes/N`` (N bytes; ``?chunked`` or ``?eof`` framing), ``/count`` (the body's length),
    ``/die`` (close without answering), ``/die-mid-response``, ``/status/CODE``,
    ``/early-hints`` (a 103 before the answer), ``/hop-headers``. Every
    response names the upstream in ``X-Upstream``.
    """

    name: str = "u1"
    drop_reused: bool = False
    """Close a kept-alive connection when its second request arrives (a stale pool entry)."""
    accepted: int = 0
    in_flight: int = 0
    peak: int = 0
    requests: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=256 * 1024)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        self._writers.add(writer)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if self.drop_reused and served:
                    return
                served += 1
                keep = await self._one(head, reader, writer)
                if not keep:
                    return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _one(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
        headers_list = [(k, v) for k, v in headers]
        lowered = {k.lower(): v for k, v in headers_list}
        body = await _read_body(reader, lowered, keep=target.startswith("/echo"))
        received = Received(
            method, target, headers_list, body if isinstance(body, int) else len(body)
        )
        self.requests.append(received)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await self._respond(received, body, writer, lowered)
        finally:
            self.in_flight -= 1

    async def _respond(
        self,
        req: Received,
        body: bytes | int,
        writer: asyncio.StreamWriter,
        headers: dict[str, str],
    ) -> bool:
        path, _, query = req.path.partition("?")
        keep = headers.get("connection", "").lower() != "close"
        if path.startswith("/sleep/"):
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        elif path == "/hold":
            await self.release.wait()
        elif path == "/die":
            return False
        elif path == "/hop-headers":
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
                b"Keep-Alive: timeout=5\r\nUpgrade: h2\r\nTrailer: X-T\r\nX-Kept: yes\r\n"
                b"Content-Length: 2\r\n\r\nok"
            )
            await writer.drain()
            return keep
        elif path == "/early-hints":
            writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        elif path == "/die-mid-response":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            await writer.drain()
            await asyncio.sleep(0.05)
            return False
        elif path.startswith("/bytes/"):
            await self._send_bytes(writer, int(path.rsplit("/", 1)[1]), query)
            return keep and query != "eof"
        status = int(path.rsplit("/", 1)[1]) if path.startswith("/status/") else 200
        if path.startswith("/echo"):
            payload = {
                "method": req.method,
                "path": req.path,
                "headers": req.headers,
                "body": body.decode("latin-1") if isinstance(body, bytes) else body,
            }
            content = json.dumps(payload).encode()
        elif path == "/count":
            content = str(req.body_bytes).encode()
        else:
            content = f"{self.name} {req.path}".encode()
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nX-Upstream: %s\r\n"
            b"Content-Length: %d\r\n\r\n%s"
            % (status, self.name.encode(), len(content), content if req.method != "HEAD" else b"")
        )
        await writer.drain()
        return keep

    async def _send_bytes(self, writer: asyncio.StreamWriter, n: int, query: str) -> None:
        if query == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif query == "eof":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        block = b"y" * CHUNK
        left = n
        while left:
            piece = block[: min(left, CHUNK)]
            left -= len(piece)
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if query == "chunked" else piece)
            await writer.drain()
        if query == "chunked":
            writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], keep: bool
) -> bytes | int:
    """The body (``keep``) or its length, read in pieces so large ones never sit in memory."""
    parts: list[bytes] = []
    total = 0
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            total += size
            if keep:
                parts.append(data)
    else:
        left = int(headers.get("content-length", "0"))
        while left:
            data = await reader.read(min(left, CHUNK))
            if not data:
                raise ConnectionError("body cut short")
            left -= len(data)
            total += len(data)
            if keep:
                parts.append(data)
    return b"".join(parts) if keep else total


# -- raw sockets ---------------------------------------------------------------------------------


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes to the router and read until it closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(-1), read_timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length or chunked response from a stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int(await reader.readuntil(b"\r\n"), 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                return status, headers, body
            body = body[:-2]
    return status, headers, await reader.readexactly(int(headers.get("content-length", "0")))


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


# -- the harness ---------------------------------------------------------------------------------


@dataclass
class Env:
    """A router on a free port, with a routing table and helpers to add instances."""

    table: RoutingTable
    router: Router
    port: int
    upstreams: list[Upstream] = field(default_factory=list)
    clients: list[httpx.AsyncClient] = field(default_factory=list)

    def host(self, service: str, tag: str | None = None) -> str:
        return self.table.host_of(service, tag)

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", timeout=10.0, headers=headers
        )
        self.clients.append(client)
        return client

    async def upstream(self, name: str = "u1", drop_reused: bool = False) -> Upstream:
        upstream = Upstream(name, drop_reused=drop_reused)
        await upstream.start()
        self.upstreams.append(upstream)
        return upstream

    def endpoint(
        self,
        service: str = "hello",
        revision: str = "hello-00001",
        *,
        cc: int = 80,
        timeout: float = 5.0,
        queue_limit: int | None = None,
        on_demand: Callable[[RevisionEndpoint], None] | None = None,
    ) -> RevisionEndpoint:
        endpoint = RevisionEndpoint(
            service,
            revision,
            container_concurrency=cc,
            timeout=timeout,
            queue_limit=queue_limit,
            on_demand=on_demand,
        )
        self.table.set_service(ServiceRoute(service, ((endpoint, 100),)))
        return endpoint

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        await self.router.aclose(grace=1.0)
        for upstream in self.upstreams:
            upstream.release.set()
            await upstream.close()


@contextlib.asynccontextmanager
async def router_env(
    settings: RouterSettings | None = None, seed: int | None = None
) -> AsyncIterator[Env]:
    table = RoutingTable(DOMAIN, rng=random.Random(seed) if seed is not None else None)
    router = Router(table, settings or RouterSettings())
    server = await router.start("127.0.0.1", 0)
    env = Env(table, router, server.sockets[0].getsockname()[1])
    try:
        yield env
    finally:
        await env.close()
