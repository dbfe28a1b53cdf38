"""Autoscaling benchmark: from zero, a step to N concurrent clients (100 ms handler,
containerConcurrency 10) through a real `cloudlet server` and dockerd; then the load falls
off and the instance count is traced down. Last, a throttled idle instance's latency next to
the same instance warm (the baseline, measured in the same run).

    python3 -m bench.autoscale [--clients 200] [--seconds 20] [--max-instances 30]

Prints: time to first response, time until every later 1 s bucket has p99 within 2x the
handler time, errors, instances over time, and throttled-vs-warm latency.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import CloudletServer  # noqa: E402
from tests.images import TESTAPP_DIR, TESTAPP_IMAGE, ensure_image  # noqa: E402

HANDLER_MS = 100
SCALING = ["--stable-window", "10s", "--scale-to-zero-grace", "5s"]


class Counter(threading.Thread):
    """The service's running container count every 0.5 s, stamped from ``t0``."""

    def __init__(self, server: CloudletServer, service: str, t0: float) -> None:
        super().__init__(daemon=True)
        self.server, self.service, self.t0 = server, service, t0
        self.trace: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            count = len(self.server.containers(self.service))
            self.trace.append((time.monotonic() - self.t0, count))


async def closed_loop(
    server: CloudletServer, service: str, plan: list[tuple[int, float]], t0: float
) -> list[tuple[float, float, int]]:
    """Clients back to back per (clients, seconds) phase; (done_at, latency, status) each."""
    results: list[tuple[float, float, int]] = []
    headers = {"Host": f"{service}.localhost:{server.router_port}"}
    url = f"http://127.0.0.1:{server.router_port}/sleep?ms={HANDLER_MS}"
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)

    async def client(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                status = (await http.get(url)).status_code
            except httpx.HTTPError:
                status = 0
            done = time.monotonic()
            results.append((done - t0, done - start, status))

    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as http:
        for clients, seconds in plan:
            until = time.monotonic() + seconds
            await asyncio.gather(*(client(http, until) for _ in range(clients)))
    return results


def steady_after(results: list[tuple[float, float, int]], limit: float) -> float | None:
    """Start of the first 1 s bucket from which every bucket's p99 is within ``limit``."""
    buckets: dict[int, list[float]] = {}
    for done_at, latency, _ in results:
        buckets.setdefault(int(done_at), []).append(latency)
    keys = sorted(buckets)
    p99 = {k: sorted(v)[max(0, int(len(v) * 0.99) - 1)] for k, v in buckets.items()}
    for i, key in enumerate(keys):
        if all(p99[k] <= limit for k in keys[i:]):
            return float(key)
    return None


def per_second(results: list[tuple[float, float, int]]) -> list[str]:
    buckets: dict[int, list[float]] = {}
    for done_at, latency, _ in results:
        buckets.setdefault(int(done_at), []).append(latency * 1000)
    rows = []
    for key in sorted(buckets):
        v = sorted(buckets[key])
        rows.append(f"{key}: {len(v)} {v[len(v) // 2]:.0f} {v[max(0, int(len(v) * 0.99) - 1)]:.0f}")
    return rows


def wait_count(server: CloudletServer, service: str, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(server.containers(service)) != wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"{service}: never reached {wanted} instances")
        time.sleep(0.5)


def step(server: CloudletServer, args: argparse.Namespace) -> None:
    service = "step"
    server.cli(
        "run", "deploy", service, "--image", TESTAPP_IMAGE, "--allow-unauthenticated",
        "--concurrency", "10", "--max-instances", str(args.max_instances),
    )  # fmt: skip
    wait_count(server, service, 0, 60)
    t0 = time.monotonic()
    counter = Counter(server, service, t0)
    counter.start()
    plan = [(args.clients, args.seconds), (args.clients // 10, args.seconds), (0, 0.0)]
    results = asyncio.run(closed_loop(server, service, plan, t0))
    phase = args.seconds
    wait_deadline = time.monotonic() + 60
    while counter.trace[-1][1] > 0 and time.monotonic() < wait_deadline:
        time.sleep(0.5)
    counter.stop.set()
    counter.join()
    report_step(args, results, counter.trace, phase)


def report_step(
    args: argparse.Namespace,
    results: list[tuple[float, float, int]],
    trace: list[tuple[float, int]],
    phase: float,
) -> None:
    step_results = [r for r in results if r[0] <= phase + 1]
    errors = sum(1 for r in results if r[2] != 200)
    first = min(r[0] for r in results)
    steady = steady_after(step_results, 2 * HANDLER_MS / 1000)
    late = [r[1] for r in step_results if r[0] >= (steady or phase)]
    print(f"\nstep from zero to {args.clients} clients, {HANDLER_MS} ms handler, concurrency 10")
    print(f"  requests {len(results)}, errors (non-200) {errors}")
    print(f"  first response after {first * 1000:.0f} ms")
    print(f"  p99 within 2x handler from t = {steady} s (bucketed by second)")
    if late:
        p50 = statistics.median(late) * 1000
        p99 = sorted(late)[int(len(late) * 0.99) - 1] * 1000
        print(f"  steady state: p50 {p50:.0f} ms ({p50 / HANDLER_MS:.2f}x handler), "
              f"p99 {p99:.0f} ms ({p99 / HANDLER_MS:.2f}x)")  # fmt: skip
    print(f"  load falls to {args.clients // 10} clients at t = {phase:.0f} s, "
          f"to 0 at t = {2 * phase:.0f} s")  # fmt: skip
    print("  per second (t: completed, p50 ms, p99 ms):")
    rows = per_second(results)
    for i in range(0, len(rows), 6):
        print("    " + "  ".join(rows[i : i + 6]))
    print("  instances over time (t s: count):")
    shown = [f"{t:.1f}:{n}" for i, (t, n) in enumerate(trace) if i % 2 == 0]
    for i in range(0, len(shown), 12):
        print("    " + "  ".join(shown[i : i + 12]))


def cpu_quota(container: str) -> str:
    return Path(f"/sys/fs/cgroup/cpu/docker/{container}/cpu.cfs_quota_us").read_text().strip()


def throttled_vs_warm(server: CloudletServer, rounds: int) -> None:
    """The same request to a throttled idle instance and to an identical revision deployed
    with --no-cpu-throttling (the baseline), alternating, each after the same idle gap."""
    for service, flags in (("idle", []), ("always-on", ["--no-cpu-throttling"])):
        server.cli(
            "run", "deploy", service, "--image", TESTAPP_IMAGE, "--allow-unauthenticated",
            "--min-instances", "1", *flags,
        )  # fmt: skip
    (container,) = server.containers("idle")
    samples: dict[str, list[float]] = {"idle": [], "always-on": []}
    throttled_seen = 0
    with httpx.Client(timeout=30) as http:
        for _ in range(rounds):
            for service, latencies in samples.items():
                time.sleep(0.4)  # past the 100 ms idle delay
                if service == "idle":
                    throttled_seen += cpu_quota(container) == "1000"
                latencies.append(timed(http, server, service))
    w = statistics.median(samples["always-on"]) * 1000
    c = statistics.median(samples["idle"]) * 1000
    print("\nthrottled idle instance vs a --no-cpu-throttling twin, GET /sleep?ms=0, 400 ms apart")
    print(f"  idle instance seen throttled before {throttled_seen}/{rounds} of its requests")
    print(f"  unthrottled p50 {w:.2f} ms, throttled p50 {c:.2f} ms: +{c - w:.2f} ms ({c / w:.2f}x)")
    print(
        f"  unthrottled p90 {pct(samples['always-on'], 0.9):.2f} ms, "
        f"throttled p90 {pct(samples['idle'], 0.9):.2f} ms"
    )


def timed(http: httpx.Client, server: CloudletServer, service: str) -> float:
    url = f"http://127.0.0.1:{server.router_port}/sleep?ms=0"
    headers = {"Host": f"{service}.localhost:{server.router_port}"}
    start = time.perf_counter()
    response = http.get(url, headers=headers)
    elapsed = time.perf_counter() - start
    if response.status_code != 200:
        raise SystemExit(f"unexpected {response.status_code}")
    return elapsed


def pct(values: list[float], q: float) -> float:
    return sorted(values)[int(len(values) * q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-instances", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    ensure_image(TESTAPP_IMAGE, TESTAPP_DIR)
    with tempfile.TemporaryDirectory() as home:
        server = CloudletServer(Path(home), SCALING)
        server.start()
        try:
            load = subprocess.run(["cat", "/proc/loadavg"], capture_output=True, text=True)
            print(f"load average before: {load.stdout.strip()}")
            step(server, args)
            throttled_vs_warm(server, args.rounds)
        finally:
            server.stop()
            server.remove_containers()


if __name__ == "__main__":
    main()
