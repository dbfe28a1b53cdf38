"""Router benchmark: throughput, latency and CPU per request through Cloudlet's router,
against the same container dialled directly and through HAProxy 2.6 (nbthread 1,
maxconn = the service's concurrency), all in one run; and cold-start time next to the
container's own create+start-to-listening time.

    python3 bench/router.py [--seconds 5] [--rounds 3] [--cold 5]

Needs dockerd, wrk, haproxy, gcc (builds a tiny static epoll HTTP server into a busybox
image). Prints ratios against the direct baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import CloudletServer  # noqa: E402

IMAGE = "cloudlet-bench-tiny:latest"
CONCURRENCY = 80


def build_image() -> None:
    with tempfile.TemporaryDirectory() as ctx:
        subprocess.run(
            [
                "gcc",
                "-O2",
                "-static",
                "-D_GNU_SOURCE",
                "-o",
                f"{ctx}/tinyhttp",
                str(REPO / "bench/tinyhttp/tinyhttp.c"),
            ],
            check=True,
        )
        shutil.copy(REPO / "bench/tinyhttp/Dockerfile", ctx)
        subprocess.run(["docker", "build", "-q", "-t", IMAGE, ctx], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and of its live child processes (the server's log
    writer), from /proc."""
    return sum(_own_cpu(p) for p in (pid, *_children(pid)))


def _own_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        found += [int(child) for child in children]
    return found


def wrk(url: str, seconds: int, host: str | None = None) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{CONCURRENCY}", f"-d{seconds}s", "--latency", url]
    if host:
        args[1:1] = ["-H", f"Host: {host}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return {
        "rps": rps,
        "requests": total,
        "p50": _latency(out, "50%"),
        "p99": _latency(out, "99%"),
        "errors": _errors(out),
    }


def _errors(out: str) -> int:
    """Non-2xx answers plus socket errors (connect, read, write, timeout)."""
    errors = 0
    for line in out.splitlines():
        if "Non-2xx" in line or "Socket errors" in line:
            errors += sum(int(n) for n in re.findall(r"(\d+)", line.split(":", 1)[1]))
    return errors


def _latency(out: str, label: str) -> float:
    value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def measured(url: str, seconds: int, pid: int | None, host: str | None = None) -> dict[str, float]:
    before = cpu_seconds(pid) if pid else 0.0
    result = wrk(url, seconds, host)
    if pid:
        result["cpu_us"] = (cpu_seconds(pid) - before) / result["requests"] * 1e6
    return result


def haproxy(backend: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    http-reuse always
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    server s1 {backend} maxconn {CONCURRENCY}
""")
    proc = subprocess.Popen(
        ["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"haproxy did not start: {proc.stderr.read().decode()}")  # type: ignore[union-attr]
        time.sleep(0.05)


def container_ip(server: CloudletServer, service: str) -> str:
    cid = server.containers(service)[0]
    out = subprocess.run(["docker", "inspect", cid], capture_output=True, text=True, check=True)
    networks = json.loads(out.stdout)[0]["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def throughput(server: CloudletServer, seconds: int, rounds: int, workdir: Path) -> None:
    server.cli(
        "run",
        "deploy",
        "tiny",
        "--image",
        IMAGE,
        "--allow-unauthenticated",
        "--concurrency",
        str(CONCURRENCY),
        "--max-instances",
        "1",
        "--min-instances",
        "1",
        # direct dialling bypasses the router, which would leave the instance
        # throttled as idle: CPU always allocated keeps the baseline fair
        "--no-cpu-throttling",
    )
    ip = container_ip(server, "tiny")
    hport = free_port()
    proxy = haproxy(f"{ip}:8080", hport, workdir)
    assert server.proc is not None
    results: dict[str, list[dict[str, float]]] = {"direct": [], "haproxy": [], "router": []}
    try:
        wrk(f"http://{ip}:8080/", 2)  # warm-up
        wrk(f"http://127.0.0.1:{server.router_port}/", 2, "tiny.localhost")
        for _ in range(rounds):
            results["direct"].append(measured(f"http://{ip}:8080/", seconds, None))
            results["haproxy"].append(measured(f"http://127.0.0.1:{hport}/", seconds, proxy.pid))
            results["router"].append(
                measured(
                    f"http://127.0.0.1:{server.router_port}/",
                    seconds,
                    server.proc.pid,
                    "tiny.localhost",
                )
            )
    finally:
        proxy.terminate()
    report(results)


def report(results: dict[str, list[dict[str, float]]]) -> None:
    base = statistics.median(r["rps"] for r in results["direct"])
    print(f"\nwrk -t1 -c{CONCURRENCY}, tiny handler, median of {len(results['direct'])} rounds")
    print(
        f"{'path':<10}{'rps':>10}{'ratio':>8}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'cpu us/req':>12}{'errors':>8}"
    )
    for name, rows in results.items():
        rps = statistics.median(r["rps"] for r in rows)
        cpu = statistics.median(r.get("cpu_us", 0.0) for r in rows)
        print(
            f"{name:<10}{rps:>10.0f}{rps / base:>8.2f}"
            f"{statistics.median(r['p50'] for r in rows):>9.2f}"
            f"{statistics.median(r['p99'] for r in rows):>9.2f}"
            f"{(f'{cpu:.1f}' if cpu else '-'):>12}{sum(r['errors'] for r in rows):>8.0f}"
        )


async def own_start_times(count: int) -> list[float]:
    """The container's own create+start-to-listening time, through the same runtime."""
    from cloudlet.autoscaler.probe import tcp_accepts
    from cloudlet.runtimes.base import InstanceSpec
    from cloudlet.runtimes.docker import DockerRuntime

    runtime = DockerRuntime("bench-own-start", network="cloudlet")
    spec = InstanceSpec(service="own", revision="own-00001-abc", configuration="own", image=IMAGE)
    times = []
    try:
        for _ in range(count):
            start = time.perf_counter()
            info = await runtime.start(spec)
            while not await tcp_accepts(info.host, info.port):
                await asyncio.sleep(0.001)
            times.append(time.perf_counter() - start)
            await runtime.stop(info.id, 0)
    finally:
        await runtime.close()
    return times


def cold_starts(server: CloudletServer, count: int) -> list[float]:
    server.cli("run", "deploy", "cold", "--image", IMAGE, "--allow-unauthenticated")
    times = []
    for _ in range(count):
        deadline = time.monotonic() + 60
        while server.containers("cold") and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        start = time.perf_counter()
        response = server.request("cold")
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, response.text
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5)
    args = parser.parse_args()
    build_image()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "home").mkdir()
        server = CloudletServer(
            workdir / "home", ["--stable-window", "6s", "--scale-to-zero-grace", "1s"]
        )
        server.start()
        try:
            throughput(server, args.seconds, args.rounds, workdir)
            cold = cold_starts(server, args.cold)
            own = asyncio.run(own_start_times(args.cold))
        finally:
            server.stop()
            server.remove_containers()
    print(
        f"\ncold start, median of {args.cold}: request at zero -> response "
        f"{statistics.median(cold) * 1000:.0f} ms; container's own create+start-to-listening "
        f"{statistics.median(own) * 1000:.0f} ms; difference "
        f"{(statistics.median(cold) - statistics.median(own)) * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
