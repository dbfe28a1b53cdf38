"""Autoscaling benchmark: from zero, a step to N concurrent clients (100 ms handler,
containerConcurrency 10) through a real `cloudlet server` and dockerd; then the load falls
off and the instance count is traced down. Then the baseline, measured in the same run: the
same clients against instances started beforehand (what the machine can do once scaling is
over). Last, a throttled idle instance's latency next to an unthrottled twin's.

    python3 -m bench.autoscale [--clients 200] [--seconds 20] [--max-instances 30]

Prints: time to first response, time until every later 1 s bucket has p99 within 2x the
handler time (and within the warm baseline's worst second), errors, ready and starting
instances and queue depth every 0.25 s (from the server's /metrics; "starting" counts
containers the engine has created), and CPU per component every second (server, load
generator, containers, engine, interrupts, steal, the rest).

The load generator is lean on purpose: closed-loop clients on raw asyncio streams with
keep-alive HTTP/1.1, in a process of its own, so that on a small machine it does not take
the CPU the system under test needs (httpx took about 20 ms of CPU per request here with
200 clients on one pool). Connection errors count as errors (status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import math
import multiprocessing
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.conftest import CloudletServer  # noqa: E402
from tests.images import TESTAPP_DIR, TESTAPP_IMAGE, ensure_image  # noqa: E402

HANDLER_MS = 100
REQUEST_TIMEOUT = 60.0
SCALING = ["--stable-window", "10s", "--scale-to-zero-grace", "5s"]
Result = tuple[float, float, int]
"""(done_at seconds after the step, latency seconds, HTTP status or 0 for a connection error)"""


# -- the load generator (runs in its own process) ---------------------------------------------


@dataclass(frozen=True)
class Target:
    port: int
    host_header: str
    path: str

    def request(self) -> bytes:
        return f"GET {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n\r\n".encode()


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """One request on a kept-alive connection: (status, whether the server keeps it open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        await read_chunked(reader)
    else:
        match = re.search(rb"content-length: *(\d+)", lower)
        await reader.readexactly(int(match.group(1)) if match else 0)
    return status, b"connection: close" not in lower


async def read_chunked(reader: asyncio.StreamReader) -> None:
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    while await reader.readuntil(b"\r\n") != b"\r\n":
        pass  # trailers


async def client(target: Target, until: float, t0: float, results: list[Result]) -> None:
    """Requests back to back until ``until``, reconnecting after a close or an error."""
    request = target.request()
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                conn = conn or await asyncio.open_connection("127.0.0.1", target.port)
                status, keep = await exchange(*conn, request)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            status, keep = 0, False
        done = time.monotonic()
        results.append((done - t0, done - start, status))
        if not keep and conn is not None:
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def closed_loop(target: Target, plan: list[tuple[int, float]], t0: float) -> list[Result]:
    """Clients back to back per (clients, seconds) phase."""
    results: list[Result] = []
    for clients, seconds in plan:
        until = time.monotonic() + seconds
        await asyncio.gather(*(client(target, until, t0, results) for _ in range(clients)))
    return results


def load_process(pipe: Connection, target: Target, plan: list[tuple[int, float]]) -> None:
    """Entry of the load generator's process: ready, wait for t0, run, send the results."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    pipe.send("ready")
    t0: float = pipe.recv()
    results = asyncio.run(closed_loop(target, plan, t0))
    pipe.send(results)


class LoadGenerator:
    """The load generator's process, started ahead so its start-up is not in the step."""

    def __init__(self, target: Target, plan: list[tuple[int, float]]) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipe, child = context.Pipe()
        self.process = context.Process(target=load_process, args=(child, target, plan))
        self.process.start()
        if self._pipe.recv() != "ready":
            raise SystemExit("load generator did not start")

    def run(self, t0: float) -> list[Result]:
        self._pipe.send(t0)
        results: list[Result] = self._pipe.recv()
        self.process.join()
        return results


# -- what the server and the machine do meanwhile -----------------------------------------------


@dataclass
class Sample:
    t: float
    ready: int
    starting: int
    queued: int


class Sampler(threading.Thread):
    """Every 0.25 s the service's instances by state and its queue depth (from the server's
    /metrics: 1.2 ms of its CPU each); every second the CPU per component (``CpuMeter``)."""

    def __init__(self, server: CloudletServer, service: str, loader: int, t0: float) -> None:
        super().__init__(daemon=True)
        self.server, self.service, self.t0 = server, service, t0
        self.token = (server.home / "token").read_text().strip()
        self.cpu = CpuMeter(server_pid=server.proc.pid if server.proc else 0, loader_pid=loader)
        self.samples: list[Sample] = []
        self.cpu_trace: list[tuple[float, dict[str, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        tick = 0
        while not self.stop.wait(0.25):
            tick += 1
            self.samples.append(self.sample())
            if tick % 4 == 0:
                self.cpu_trace.append((time.monotonic() - self.t0, self.cpu.take()))

    def sample(self) -> Sample:
        host, port = self.server.api.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {self.token}"})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        return Sample(time.monotonic() - self.t0, *gauges(text, self.service))


def gauges(metrics: str, service: str) -> tuple[int, int, int]:
    """(ready, starting, queued) of a service from Prometheus text (throttled is ready)."""
    counts = {"ready": 0, "throttled": 0, "starting": 0, "queued": 0}
    pattern = re.compile(r'^(cloudlet_\w+)\{service="([^"]*)".*?(?:state="(\w+)")?\} (\S+)$')
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match is None or match.group(2) != service:
            continue
        name, _, state, value = match.groups()
        key = state if name == "cloudlet_instances" else "queued"
        if name in ("cloudlet_instances", "cloudlet_queue_depth") and key in counts:
            counts[key] += int(float(value))
    return counts["ready"] + counts["throttled"], counts["starting"], counts["queued"]


class CpuMeter:
    """Cores used per component since the last ``take`` (CPU seconds over wall seconds).

    ``machine`` is every CPU's busy time; ``irq`` (interrupts, mostly the network) and
    ``steal`` (this VM waiting for its host) are part of it, attributed to no process.
    ``other`` is what is left: short-lived processes (runc, per container start), kernel
    threads, and anyone else's work on the machine."""

    def __init__(self, server_pid: int, loader_pid: int) -> None:
        self.pids = {"server": server_pid, "load": loader_pid, "bench": os.getpid()}
        self.last: dict[str, int] = {}
        self.last_at = time.monotonic()
        self.machine = machine_ticks()
        self.containers = cgroup_cpu("docker")

    def take(self) -> dict[str, float]:
        now, hz = time.monotonic(), os.sysconf("SC_CLK_TCK")
        wall, self.last_at = now - self.last_at, now
        ticks = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        ticks |= {f"engine/{pid}": proc_cpu(pid) for pid in engine_pids()}
        # a process that exited reads 0: count nothing for it rather than a negative
        spent = {
            k: max(0, v - self.last.get(k, 0 if k.startswith("engine/") else v))
            for k, v in ticks.items()
        }
        self.last = ticks
        machine, containers = machine_ticks(), cgroup_cpu("docker")
        busy = {k: (v - self.machine[k]) / hz / wall for k, v in machine.items()}
        cores = {
            "machine": busy["busy"],
            "server": spent["server"] / hz / wall,
            "load": spent["load"] / hz / wall,
            "containers": (containers - self.containers) / wall,
            "engine": sum(v for k, v in spent.items() if k.startswith("engine/")) / hz / wall,
            "irq": busy["irq"],
            "steal": busy["steal"],
        }
        self.machine, self.containers = machine, containers
        ours = sum(cores.values()) - cores["machine"] + spent["bench"] / hz / wall
        cores["other"] = max(0.0, cores["machine"] - ours)
        return cores


def engine_pids() -> list[int]:
    """dockerd, containerd and the containers' shims (runc runs briefly under the shims)."""
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError):
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            if comm in ("dockerd", "containerd") or comm.startswith("containerd-shim"):
                pids.append(int(pid))
    return pids


def machine_ticks() -> dict[str, int]:
    """Clock ticks of all CPUs: busy (all but idle and iowait), interrupts, steal."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    line = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks = dict(zip(names, (int(v) for v in line), strict=False))
    busy = sum(int(v) for v in line[:8]) - ticks["idle"] - ticks["iowait"]
    return {"busy": busy, "irq": ticks["irq"] + ticks["softirq"], "steal": ticks["steal"]}


def proc_cpu(pid: int) -> int:
    """Clock ticks a process has run, user + system."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(stat[11]) + int(stat[12])


def cgroup_cpu(group: str) -> float:
    path = Path(f"/sys/fs/cgroup/cpuacct/{group}/cpuacct.usage")
    return int(path.read_text()) / 1e9 if path.exists() else 0.0


# -- the step -------------------------------------------------------------------------------------


def steady_after(results: list[Result], limit: float) -> float | None:
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


def per_second(results: list[Result]) -> list[str]:
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


@dataclass
class Run:
    """One load run: every request's result, what the sampler saw, the wall clock at t0."""

    results: list[Result]
    sampler: Sampler
    began: float


def drive(server: CloudletServer, service: str, plan: list[tuple[int, float]], settle: bool) -> Run:
    """Run ``plan`` against ``service``; with ``settle``, keep sampling until it is at zero."""
    target = Target(
        server.router_port, f"{service}.localhost:{server.router_port}", f"/sleep?ms={HANDLER_MS}"
    )
    loader = LoadGenerator(target, plan)
    t0, began = time.monotonic(), time.time()
    sampler = Sampler(server, service, loader.process.pid or 0, t0)
    sampler.start()
    results = loader.run(t0)
    deadline = time.monotonic() + 60
    while settle and time.monotonic() < deadline:
        if sampler.samples and not sampler.samples[-1].ready + sampler.samples[-1].starting:
            break
        time.sleep(0.5)
    sampler.stop.set()
    sampler.join()
    return Run(results, sampler, began)


def deploy(server: CloudletServer, service: str, *flags: str) -> None:
    server.cli(
        "run", "deploy", service, "--image", TESTAPP_IMAGE, "--allow-unauthenticated",
        "--concurrency", "10", *flags,
    )  # fmt: skip


def step(server: CloudletServer, args: argparse.Namespace) -> Run:
    """From zero, ``clients`` for ``seconds``, then a tenth of them, then none."""
    deploy(server, "step", "--max-instances", str(args.max_instances))
    wait_count(server, "step", 0, 60)
    plan = [(args.clients, args.seconds), (args.clients // 10, args.seconds)]
    return drive(server, "step", plan, settle=True)


def warm_baseline(server: CloudletServer, args: argparse.Namespace) -> Run:
    """The same load against ``warm`` instances started beforehand: what this machine can do
    once scaling is over, so the step's latency can be read against it."""
    count = str(args.warm)
    deploy(server, "warm", "--min-instances", count, "--max-instances", count)
    wait_count(server, "warm", args.warm, 120)
    time.sleep(2)  # the last ones are probed ready
    run = drive(server, "warm", [(args.clients, args.seconds)], settle=False)
    server.cli("run", "services", "delete", "warm", "--quiet")
    wait_count(server, "warm", 0, 60)
    return run


def report_step(args: argparse.Namespace, run: Run, warm: Run | None) -> None:
    phase, results = args.seconds, run.results
    step_results = [r for r in results if r[0] <= phase + 1]
    errors = sum(1 for r in results if r[2] != 200)
    first = min(r[0] for r in results)
    steady = steady_after(step_results, 2 * HANDLER_MS / 1000)
    late = [r[1] for r in step_results if r[0] >= (steady or phase)]
    print(f"\nstep from zero to {args.clients} clients, {HANDLER_MS} ms handler, concurrency 10")
    print(f"  began at {clock_time(run.began)} (wall clock, to read the server log against)")
    print(f"  requests {len(results)}, errors (non-200 or connection) {errors}")
    print(f"  first response after {first * 1000:.0f} ms")
    print(f"  p99 within 2x handler from t = {steady} s (bucketed by second)")
    if late:
        p50 = statistics.median(late) * 1000
        p99 = sorted(late)[max(0, int(len(late) * 0.99) - 1)] * 1000
        print(f"  from then to the end of the step: p50 {p50:.0f} ms ({p50 / HANDLER_MS:.2f}x "
              f"handler), p99 {p99:.0f} ms ({p99 / HANDLER_MS:.2f}x)")  # fmt: skip
    if warm is not None:
        limit = worst_p99(warm.results)
        print(f"  p99 within the warm baseline's worst second ({limit * 1000:.0f} ms) from "
              f"t = {steady_after(step_results, limit)} s")  # fmt: skip
    print(f"  load falls to {args.clients // 10} clients at t = {phase:.0f} s, "
          f"to 0 at t = {2 * phase:.0f} s")  # fmt: skip
    report_trace(run, 2 * phase + 2)


def report_warm(args: argparse.Namespace, run: Run) -> None:
    latencies = sorted(r[1] for r in run.results)
    p50, p99 = latencies[len(latencies) // 2] * 1000, latencies[int(len(latencies) * 0.99)] * 1000
    errors = sum(1 for r in run.results if r[2] != 200)
    rate = len(run.results) / args.seconds
    print(f"\nwarm baseline: {args.clients} clients for {args.seconds:g} s against {args.warm} "
          f"instances started beforehand")  # fmt: skip
    could = args.clients * 1000 / HANDLER_MS
    worst = worst_p99(run.results) * 1000
    print(f"  requests {len(run.results)} ({rate:.0f}/s; {args.clients} clients x "
          f"{HANDLER_MS} ms could do {could:.0f}/s), errors {errors}")  # fmt: skip
    print(f"  p50 {p50:.0f} ms ({p50 / HANDLER_MS:.2f}x handler), p99 {p99:.0f} ms "
          f"({p99 / HANDLER_MS:.2f}x), worst second's p99 {worst:.0f} ms")  # fmt: skip
    report_trace(run, args.seconds + 1)


def report_trace(run: Run, until: float) -> None:
    print("  per second (t: completed, p50 ms, p99 ms):")
    print_rows(per_second(run.results), 6)
    print("  instances ready+starting and queued requests (t s: ready+starting q queued):")
    shown = [
        f"{s.t:.2f}:{s.ready}+{s.starting} q{s.queued}"
        for i, s in enumerate(run.sampler.samples)
        if s.t < 4 or i % 4 == 0
    ]
    print_rows(shown, 8)
    print("  CPU in cores (t: machine = server load containers engine irq steal other):")
    cpu = [
        f"{t:.0f}: {c['machine']:.2f} = {c['server']:.2f} {c['load']:.2f} "
        f"{c['containers']:.2f} {c['engine']:.2f} {c['irq']:.2f} {c['steal']:.2f} {c['other']:.2f}"
        for t, c in run.sampler.cpu_trace[1:]
        if t < until
    ]
    print_rows(cpu, 3)


def worst_p99(results: list[Result]) -> float:
    """The highest per-second p99, leaving out the first second (connections being made)
    and the last (partly empty)."""
    buckets: dict[int, list[float]] = {}
    for done_at, latency, _ in results:
        buckets.setdefault(int(done_at), []).append(latency)
    keys = sorted(buckets)[1:-1] or sorted(buckets)
    return max(sorted(buckets[k])[max(0, int(len(buckets[k]) * 0.99) - 1)] for k in keys)


def clock_time(wall: float) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(wall))}.{int(wall % 1 * 1000):03d}"


def print_rows(items: list[str], per_row: int) -> None:
    for i in range(0, len(items), per_row):
        print("    " + "  ".join(items[i : i + per_row]))


# -- throttled idle instance ----------------------------------------------------------------


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
    print(f"  unthrottled p50 {w:.2f} ms, throttled p50 {c:.2f} ms: {c - w:+.2f} ms ({c / w:.2f}x)")
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
    parser.add_argument("--rounds", type=int, default=40, help="throttled-idle samples (0: skip)")
    parser.add_argument("--warm", type=int, help="baseline instances (default: what the KPA wants)")
    parser.add_argument("--server-log", type=Path, help="keep the server's log here")
    args = parser.parse_args()
    if args.warm is None:  # the KPA's count for this load: clients / (10 x 0.7)
        args.warm = min(args.max_instances, math.ceil(args.clients / 7))
    ensure_image(TESTAPP_IMAGE, TESTAPP_DIR)
    with tempfile.TemporaryDirectory() as home:
        server = CloudletServer(Path(home), SCALING)
        server.start()
        try:
            print(f"load average before: {Path('/proc/loadavg').read_text().strip()}")
            stepped = step(server, args)
            warm = warm_baseline(server, args) if args.warm else None
            report_step(args, stepped, warm)
            if warm is not None:
                report_warm(args, warm)
            if args.rounds:
                throttled_vs_warm(server, args.rounds)
            print(f"\nload average after: {Path('/proc/loadavg').read_text().strip()}")
        finally:
            server.stop()
            server.remove_containers()
            if args.server_log:
                shutil.copyfile(server.log, args.server_log)


if __name__ == "__main__":
    main()
