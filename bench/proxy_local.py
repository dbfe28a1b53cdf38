"""Quick local benchmark of the router: wrk against a tiny upstream, directly and proxied.

Runs a minimal uvloop+httptools upstream answering "ok" and the router, each in its own
process, then ``wrk -t1 -c80 -d5s`` against the upstream and against the router. Prints
requests/s, the ratio to direct, p50/p99 latency and the router's CPU time per request
(from /proc/PID/stat of the router process). ``--floor`` also measures a bare callback
proxy with none of the router's features, which shows what this machine allows right now;
``--baseline SRC`` also measures the router of another source tree (a ``src`` directory,
e.g. from ``git archive OLD src | tar -x -C /tmp/old``), to compare two versions in one run.
With ``--rounds N`` the targets take turns N times and the medians are printed. Bounded:
about (1 s warm-up + duration) per target and round. ``--instructions`` counts instead the
user-space instructions per request of each proxy process under valgrind's callgrind
(exactly 1000 and then 6000 requests over the connections, the difference over 5000),
which unlike time does not depend on what else the machine is doing.

    python bench/proxy_local.py [--duration 5] [--connections 80] [--floor] [--logging]
        [--baseline /tmp/old/src] [--rounds 1] [--instructions]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

HOST_HEADER = "hello.bench.local"
_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


# -- the processes ------------------------------------------------------------------------------


def serve_upstream(port: int) -> None:
    """The tiny upstream: answers "ok" to every request."""
    import httptools
    import uvloop

    class Tiny(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            self.transport.write(_OK)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Tiny, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


def serve_router(port: int, upstream_port: int, src: str = "", logging: bool = False) -> None:
    """The router with one service, one revision (containerConcurrency 80), one instance;
    with ``logging``, request logging as the server does it (the telemetry hub's buffer and
    metrics, batches to the log writer process storing into a scratch logs.db)."""
    import uvloop

    sys.path.insert(0, src or str(Path(__file__).resolve().parents[1] / "src"))
    from cloudlet.dataplane import (
        RevisionEndpoint,
        RouterSettings,
        RoutingTable,
        ServiceRoute,
        start_router,
    )

    async def main() -> None:
        table = RoutingTable("bench.local")
        endpoint = RevisionEndpoint("hello", "hello-00001", container_concurrency=80, timeout=300)
        endpoint.add_backend("i1", "127.0.0.1", upstream_port)
        table.set_service(ServiceRoute("hello", ((endpoint, 100),)))
        if logging:
            await log_requests(table)
        server = await start_router(table, "127.0.0.1", port, RouterSettings())
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


async def log_requests(table: Any) -> None:
    from cloudlet.telemetry.collector import Telemetry
    from cloudlet.telemetry.logs import LogStore
    from cloudlet.telemetry.writer import LogWriter

    db = Path(tempfile.mkdtemp(prefix="bench-logs-")) / "logs.db"
    telemetry = Telemetry(LogStore(db, 256 * 2**20), sink=LogWriter(db, 256 * 2**20))
    await telemetry.sink.start()
    table.on_request_done = telemetry.request_done
    TASKS.add(asyncio.get_running_loop().create_task(telemetry.run()))


TASKS: set[asyncio.Task[None]] = set()


def serve_floor(port: int, upstream_port: int) -> None:
    """A bare callback proxy with none of the router's features (routing, slots, timeouts,
    header rewriting, flow control): the floor of proxying cost on this machine."""
    import httptools
    import uvloop

    pool: list[Upstream] = []

    class Upstream(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.parser = httptools.HttpResponseParser(self)
            self.client: Client | None = None

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            assert self.client is not None
            self.client.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body)

        def on_message_complete(self) -> None:
            self.client = None
            pool.append(self)

    class Client(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            self.parser = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_url(self, url: bytes) -> None:
            self.url = url

        def on_message_complete(self) -> None:
            head = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.url
            if pool:
                upstream = pool.pop()
                upstream.client = self
                upstream.transport.write(head)
            else:
                tasks.add(asyncio.get_running_loop().create_task(self.connect(head)))

        async def connect(self, head: bytes) -> None:
            loop = asyncio.get_running_loop()
            _, upstream = await loop.create_connection(Upstream, "127.0.0.1", upstream_port)
            upstream.client = self
            upstream.transport.write(head)

    tasks: set[asyncio.Task[None]] = set()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Client, "127.0.0.1", port, backlog=1024)
        print("ready", flush=True)
        await server.serve_forever()

    uvloop.run(main())


# -- the driver -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(*args: str) -> subprocess.Popen[str]:
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115  # the child writes it; we only name it
        "w", prefix=f"bench{args[0]}-", suffix=".log", delete=False
    )
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, stderr=log, text=True
    )
    log.close()
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"{args[0]} did not start; see {log.name}")
    LOGS.append(Path(log.name))
    return proc


LOGS: list[Path] = []
"""Logs of the processes that started; removed at the end unless they hold something."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, connections: int, duration: float, host: str | None) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", url]
    if host:
        cmd[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=duration + 30, check=True
    ).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result = {
        "rps": float(rps.group(1)) if rps else 0.0,
        "requests": float(total.group(1)) if total else 0.0,
        "errors": float(errors.group(1)) if errors else 0.0,
    }
    for pct in ("50", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if match:
            scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[match.group(2)]
            result[f"p{pct}_ms"] = float(match.group(1)) * scale
    return result


def measure(
    proc: subprocess.Popen[str] | None, url: str, args: argparse.Namespace, host: str | None
) -> dict[str, float]:
    """wrk against url after a 1 s warm-up; with ``proc``, also its CPU per request."""
    wrk(url, args.connections, 1, host)
    before = cpu_seconds(proc.pid) if proc else 0.0
    started = time.monotonic()
    result = wrk(url, args.connections, args.duration, host)
    result["elapsed"] = time.monotonic() - started
    if proc:
        result["cpu"] = cpu_seconds(proc.pid) - before
    return result


def report(name: str, r: dict[str, float], direct: dict[str, float]) -> None:
    line = (
        f"{name:>7}: {r['rps']:9.0f} req/s ({r['rps'] / direct['rps']:.2f}x)  "
        f"p50 {r.get('p50_ms', 0):6.2f} ms  p99 {r.get('p99_ms', 0):6.2f} ms  "
        f"non-2xx {r['errors']:.0f}"
    )
    if "cpu" in r and r["requests"]:
        line += (
            f"  CPU {r['cpu'] / r['requests'] * 1e6:5.1f} us/request "
            f"({r['cpu'] / r['elapsed']:.0%} of a core)"
        )
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--floor", action="store_true", help="also measure a bare callback proxy, for scale"
    )
    parser.add_argument("--baseline", help="also measure the router of this src directory")
    parser.add_argument(
        "--logging", action="store_true", help="also measure the router with request logging"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per request instead"
    )
    args = parser.parse_args()
    if args.instructions:
        count_instructions(args)
        return
    up_port = free_port()
    procs = [spawn("--serve-upstream", str(up_port))]
    targets: list[tuple[str, subprocess.Popen[str], int, str | None]] = []
    results: dict[str, list[dict[str, float]]] = {"direct": []}
    try:
        wanted: list[tuple[str, str, str | None, list[str]]] = [
            ("router", "--serve-router", HOST_HEADER, [])
        ]
        if args.logging:
            wanted.append(("logged", "--serve-logged-router", HOST_HEADER, []))
        if args.baseline:
            wanted.append(("baseline", "--serve-router", HOST_HEADER, [args.baseline]))
        if args.floor:
            wanted.append(("floor", "--serve-floor", None, []))
        for name, mode, host, extra in wanted:
            port = free_port()
            procs.append(spawn(mode, str(port), str(up_port), *extra))
            targets.append((name, procs[-1], port, host))
            results[name] = []
        for _ in range(args.rounds):
            results["direct"].append(measure(None, f"http://127.0.0.1:{up_port}/", args, None))
            for name, proc, port, host in targets:
                results[name].append(measure(proc, f"http://127.0.0.1:{port}/", args, host))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=10)
        for log in LOGS:
            if log.exists() and log.stat().st_size == 0:
                log.unlink()
    print(
        f"wrk -t1 -c{args.connections} -d{args.duration:g}s, {os.cpu_count()} cores, "
        f"median of {args.rounds} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    direct = medians(results["direct"])
    for name, rows in results.items():
        report(name, medians(rows), direct)


def count_instructions(args: argparse.Namespace) -> None:
    up_port = free_port()
    upstream = spawn("--serve-upstream", str(up_port))
    wanted = [("router", "--serve-router", HOST_HEADER, [])]
    if args.logging:
        wanted.append(("logged", "--serve-logged-router", HOST_HEADER, []))
    if args.baseline:
        wanted.append(("baseline", "--serve-router", HOST_HEADER, [args.baseline]))
    if args.floor:
        wanted.append(("floor", "--serve-floor", "x", []))
    try:
        for name, mode, host, extra in wanted:
            low, high = (
                instructions([mode, str(free_port()), str(up_port), *extra], host, n, args)
                for n in (1000, 6000)
            )
            print(f"{name:>8}: {(high - low) / 5000:8.0f} instructions/request")
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


def instructions(serve: list[str], host: str, count: int, args: argparse.Namespace) -> int:
    """User-space instructions of a proxy process (``serve``: its arguments) that answered
    ``count`` requests, start-up and shutdown included."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [
                *("valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out"),
                *(sys.executable, __file__, *serve),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"{serve[0]} did not start under valgrind")
        port = int(serve[1])
        asyncio.run(fixed_requests(port, host.encode(), count, args.connections))
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=300)[1]
    found = re.search(r"Collected : (\d+)", err)
    if found is None:
        raise RuntimeError(f"no callgrind total for {serve[0]}: {err[-500:]}")
    return int(found.group(1))


async def fixed_requests(port: int, host: bytes, count: int, connections: int) -> None:
    """Exactly ``count`` GET requests over keep-alive connections, one at a time on each."""
    left = [count]
    request = b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"

    async def one_connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left[0] > 0:
            left[0] -= 1
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            start = head.index(b"content-length:") + 15
            await reader.readexactly(int(head[start : head.index(b"\r\n", start)]))
        writer.close()

    await asyncio.wait_for(asyncio.gather(*(one_connection() for _ in range(connections))), 600)


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (CPU as a median per request and per second)."""
    result = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    if "cpu" in rows[0]:
        per_request = statistics.median(row["cpu"] / row["requests"] for row in rows)
        per_second = statistics.median(row["cpu"] / row["elapsed"] for row in rows)
        result.update(cpu=per_second, elapsed=1.0, requests=per_second / per_request)
    return result


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]))
    elif len(sys.argv) > 3 and sys.argv[1] == "--serve-router":
        serve_router(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])
    elif len(sys.argv) > 3 and sys.argv[1] == "--serve-logged-router":
        serve_router(int(sys.argv[2]), int(sys.argv[3]), logging=True)
    elif len(sys.argv) > 3 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
