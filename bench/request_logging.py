"""Logging benchmark: router throughput with request logging on vs off, in one run.

    python3 bench/request_logging.py [--seconds 5] [--rounds 3]

One child process runs two Cloudlet routers on one uvloop loop, both routing to the same
revision endpoint, whose one backend is a tiny static C HTTP server (bench/tinyhttp, run
as a plain process so the router is the bottleneck). Router A has request logging on (the
server's Telemetry: buffer, metrics and a 0.5 s batch flush to the log writer process, which
stores into logs.db); router B has it off. wrk (1 thread, 80 connections) loads them in
alternation; the script prints the median requests/s of each and their ratio (goal: >= 0.9),
CPU per request of the router and of the log writer process, and how many request entries
were stored.
Needs wrk and gcc.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONCURRENCY = 80
HOST = "bench.localhost"

CHILD = """
import asyncio, sys, uvloop
from pathlib import Path
from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.proxy import RouterSettings, start_router
from cloudlet.dataplane.routing import RoutingTable, ServiceRoute
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import LogStore
from cloudlet.telemetry.writer import LogWriter

async def main(backend_port, port_on, port_off, db):
    endpoint = RevisionEndpoint("bench", "bench-00001-abc", container_concurrency=80,
                                timeout=60)
    endpoint.add_backend("tiny", "127.0.0.1", backend_port)
    route = ServiceRoute("bench", ((endpoint, 100),))
    telemetry = Telemetry(LogStore(Path(db), 256 * 2**20), sink=LogWriter(Path(db), 256 * 2**20))
    await telemetry.sink.start()
    flusher = asyncio.create_task(telemetry.run())
    routers = []
    for port, logging_on in ((port_on, True), (port_off, False)):
        table = RoutingTable("localhost")
        table.set_service(route)
        if logging_on:
            table.on_request_done = telemetry.request_done
        routers.append(await start_router(table, "127.0.0.1", port, RouterSettings()))
    print("ready", telemetry.sink.pid, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(15, stop.set)
    await stop.wait()
    flusher.cancel()
    await telemetry.close()
    telemetry.store.close()

uvloop.run(main(*map(int, sys.argv[1:4]), sys.argv[4]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, all its threads (the flush thread included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pids: tuple[int, int], port: int, seconds: int) -> tuple[float, float, float]:
    """(requests/s, router and log writer CPU microseconds per request) of one wrk run."""
    before = [cpu_seconds(pid) for pid in pids]
    rps = wrk(port, seconds)
    router, writer = (
        (cpu_seconds(pid) - b) / (rps * seconds) * 1e6 for pid, b in zip(pids, before, strict=True)
    )
    return rps, router, writer


def wrk(port: int, seconds: int) -> float:
    out = subprocess.run(
        [
            "wrk",
            "-H",
            f"Host: {HOST}",
            "-t1",
            f"-c{CONCURRENCY}",
            f"-d{seconds}s",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"errors under load:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        binary = f"{tmp}/tinyhttp"
        subprocess.run(
            ["gcc", "-O2", "-D_GNU_SOURCE", "-o", binary, str(REPO / "bench/tinyhttp/tinyhttp.c")],
            check=True,
        )
        backend_port, port_on, port_off = free_port(), free_port(), free_port()
        backend = subprocess.Popen([binary], env={**os.environ, "PORT": str(backend_port)})
        db = f"{tmp}/logs.db"
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(backend_port), str(port_on), str(port_off), db],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        )
        try:
            wait_port(backend_port)
            assert child.stdout is not None
            ready, writer_pid = child.stdout.readline().split()
            assert ready == "ready"
            pids = (child.pid, int(writer_pid))
            wrk(port_on, 1)  # warm up both paths
            wrk(port_off, 1)
            on: list[tuple[float, float, float]] = []
            off: list[tuple[float, float, float]] = []
            for _ in range(args.rounds):
                off.append(measured(pids, port_off, args.seconds))
                on.append(measured(pids, port_on, args.seconds))
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(30)
            backend.terminate()
            backend.wait(10)
        stored = (
            sqlite3.connect(db)
            .execute("SELECT coalesce(sum(count), 0) FROM request_chunks")
            .fetchone()[0]
        )
    report("off", off)
    report("on", on)
    rps_ratio = statistics.median(r[0] for r in on) / statistics.median(r[0] for r in off)
    cpu_off = statistics.median(r[1] + r[2] for r in off)
    cpu_on = statistics.median(r[1] + r[2] for r in on)
    print(
        f"throughput on/off: {rps_ratio:.3f}; CPU per request (router + writer) off/on: "
        f"{cpu_off / cpu_on:.3f} (goal >= 0.9); request entries stored: {stored}"
    )


def report(name: str, runs: list[tuple[float, float, float]]) -> None:
    rps = statistics.median(r[0] for r in runs)
    router = statistics.median(r[1] for r in runs)
    writer = statistics.median(r[2] for r in runs)
    print(
        f"logging {name:>3}: {rps:8.0f} req/s, CPU/request: router {router:5.1f} us + "
        f"log writer {writer:4.1f} us (rounds: {[round(r[0]) for r in runs]})"
    )


if __name__ == "__main__":
    main()
