"""Autoscaling and the instance lifecycle against real dockerd: scale-out under a burst
without breaking the concurrency limit, min/max instances, idle CPU throttling, probes,
crashes and scale-down drain. Instances are read directly (their /stats, their cgroup)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import CloudletServer, wait_for

pytestmark = pytest.mark.docker

HANDLER = "/sleep?ms=100"
NORMAL_QUOTA = "100000"  # one CPU
THROTTLED_QUOTA = "1000"


def deploy(server: CloudletServer, name: str, image: str, *flags: str) -> None:
    server.cli("run", "deploy", name, "--image", image, "--allow-unauthenticated", *flags)


def ip_of(container: str) -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}"
    done = subprocess.run(
        ["docker", "inspect", "-f", fmt, container], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def peak_of(container: str) -> int:
    """The instance's own report of the most requests it ever had at once."""
    return int(httpx.get(f"http://{ip_of(container)}:8080/stats", timeout=10).json()["peak"])


def cpu_quota(container: str) -> str:
    return Path(f"/sys/fs/cgroup/cpu/docker/{container}/cpu.cfs_quota_us").read_text().strip()


async def burst(server: CloudletServer, service: str, count: int) -> list[int]:
    """``count`` requests at once through the router; their status codes."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    headers = {"Host": f"{service}.localhost:{server.router_port}"}
    url = f"http://127.0.0.1:{server.router_port}{HANDLER}"
    async with httpx.AsyncClient(limits=limits, timeout=120, headers=headers) as client:
        responses = await asyncio.gather(*(client.get(url) for _ in range(count)))
    return [r.status_code for r in responses]


class InstanceCounter(threading.Thread):
    """Samples the service's container count every 0.2 s until stopped and, with
    ``peaks``, each instance's own peak concurrency (instances may be retired early)."""

    def __init__(self, server: CloudletServer, service: str, peaks: bool = False) -> None:
        super().__init__(daemon=True)
        self.server, self.service, self.read_peaks = server, service, peaks
        self.counts: list[int] = []
        self.peaks: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            containers = self.server.containers(self.service)
            self.counts.append(len(containers))
            for container in containers if self.read_peaks else ():
                with contextlib.suppress(httpx.HTTPError, subprocess.CalledProcessError):
                    self.peaks[container] = max(self.peaks.get(container, 0), peak_of(container))

    def __enter__(self) -> InstanceCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def test_a_burst_scales_out_to_max_instances_and_no_instance_exceeds_its_concurrency(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "burst", testapp_image, "--concurrency", "10", "--max-instances", "6")
    with InstanceCounter(server, "burst", peaks=True) as counter:
        codes = asyncio.run(burst(server, "burst", 300))
        # A second burst meets the instances the first one started (on a busy machine
        # the first can finish on one instance before the others are ready).
        codes += asyncio.run(burst(server, "burst", 300))
    assert codes == [200] * 600
    assert 1 < max(counter.counts) <= 6
    for container in server.containers("burst"):  # the final word of those still running
        with contextlib.suppress(httpx.HTTPError, subprocess.CalledProcessError):
            counter.peaks[container] = max(counter.peaks.get(container, 0), peak_of(container))
    assert len(counter.peaks) > 1
    assert max(counter.peaks.values()) <= 10 and sum(counter.peaks.values()) > 10


def test_min_instances_keep_an_instance_through_idle(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "warm", testapp_image, "--min-instances", "1")
    (first,) = server.containers("warm")
    time.sleep(12)  # the server scales an idle service to zero after 6 s + 2 s
    assert server.containers("warm") == [first]
    assert server.request("warm", HANDLER).status_code == 200


def test_an_idle_instance_is_throttled_and_unthrottled_for_its_next_request(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "idle", testapp_image)
    (container,) = server.containers("idle")
    wait_for(lambda: cpu_quota(container) == THROTTLED_QUOTA, 10, "the idle instance throttled")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.request, "idle", "/sleep?ms=1500")
        wait_for(lambda: cpu_quota(container) == NORMAL_QUOTA, 1, "CPU back for the request")
        assert slow.result().status_code == 200
    wait_for(lambda: cpu_quota(container) == THROTTLED_QUOTA, 10, "throttled again when idle")


def test_an_instance_without_cpu_throttling_keeps_its_cpu_when_idle(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "always-on", testapp_image, "--no-cpu-throttling")
    (container,) = server.containers("always-on")
    assert server.request("always-on", HANDLER).status_code == 200
    time.sleep(1)
    assert cpu_quota(container) == NORMAL_QUOTA


def test_liveness_failures_replace_the_instance(server: CloudletServer, testapp_image: str) -> None:
    probe = "httpGet.path=/status?code=500,periodSeconds=1,failureThreshold=3"
    deploy(server, "sick", testapp_image, "--min-instances", "1", "--liveness-probe", probe)
    (first,) = server.containers("sick")
    wait_for(lambda: first not in server.containers("sick"), 30, "the unhealthy instance gone")
    wait_for(lambda: len(server.containers("sick")) == 1, 30, "a replacement instance")
    assert "liveness probe (GET /status?code=500) failed 3 times" in server.log.read_text()


def test_a_failing_startup_probe_fails_the_revision_with_a_reason(
    server: CloudletServer, testapp_image: str
) -> None:
    probe = "httpGet.path=/status?code=503,periodSeconds=1,failureThreshold=2"
    done = server.cli(
        "run",
        "deploy",
        "never-ready",
        "--image",
        testapp_image,
        "--startup-probe",
        probe,
        check=False,
    )
    assert done.returncode != 0
    assert "did not answer the startup probe GET /status?code=503" in done.stdout + done.stderr
    assert server.containers("never-ready") == []


def test_a_crashed_instance_fails_its_requests_with_502_and_is_replaced(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "crashy", testapp_image)
    (container,) = server.containers("crashy")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hanging = pool.submit(server.request, "crashy", "/sleep?ms=20000")
        time.sleep(0.5)
        subprocess.run(["docker", "kill", container], capture_output=True, check=True)
        assert hanging.result(timeout=10).status_code == 502
    assert server.request("crashy", HANDLER).status_code == 200
    assert container not in server.containers("crashy")


def test_scaling_down_under_falling_load_gives_no_errors(
    server: CloudletServer, testapp_image: str
) -> None:
    deploy(server, "falling", testapp_image, "--concurrency", "10", "--max-instances", "4")
    with InstanceCounter(server, "falling") as counter:
        codes = asyncio.run(steps(server, "falling", [(40, 5.0), (4, 14.0)]))
    assert codes and all(200 <= code < 300 for code in codes)
    peak_at = counter.counts.index(max(counter.counts))
    assert max(counter.counts) > 1 and min(counter.counts[peak_at:]) < max(counter.counts)


async def steps(server: CloudletServer, service: str, plan: list[tuple[int, float]]) -> list[int]:
    """Closed-loop load: for each (workers, seconds), that many clients back to back."""
    codes: list[int] = []
    headers = {"Host": f"{service}.localhost:{server.router_port}"}
    url = f"http://127.0.0.1:{server.router_port}{HANDLER}"
    async with httpx.AsyncClient(timeout=60, headers=headers) as client:

        async def worker(until: float) -> None:
            while time.monotonic() < until:
                codes.append((await client.get(url)).status_code)

        for workers, seconds in plan:
            until = time.monotonic() + seconds
            await asyncio.gather(*(worker(until) for _ in range(workers)))
    return codes
