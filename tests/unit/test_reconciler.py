"""The reconciler and the idle throttler above the runtime seam: FakeRuntime instances that
listen on a real local socket, hand-driven timers for the throttle delay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from cloudlet.autoscaler.reconciler import Reconciler, RevisionRun
from cloudlet.autoscaler.throttle import IdleThrottler, compose_hooks
from cloudlet.dataplane.activator import Backend, Ticket
from cloudlet.domain.autoscale import ScalingPolicy, cold_start_limit, starts_allowed
from cloudlet.domain.probes import ProbeSettings
from cloudlet.domain.revision import RevisionConfig
from cloudlet.runtimes.base import InstanceInfo, InstanceSpec
from cloudlet.runtimes.docker import THROTTLED_QUOTA_US, cpu_quota_us
from cloudlet.runtimes.fake import FakeRuntime
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import LogStore

REVISION = "svc-00001-abc"


@dataclass
class FakeTimer:
    at: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTimers:
    now: float = 0.0
    timers: list[FakeTimer] = field(default_factory=list)

    def __call__(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in sorted(self.timers, key=lambda t: t.at):
            if not timer.cancelled and timer.at <= self.now:
                timer.cancelled = True
                timer.callback()


async def started(runtime: FakeRuntime, cpu_boost: bool = False) -> str:
    spec = InstanceSpec("svc", REVISION, "svc", "img", cpu_millis=1000, cpu_boost=cpu_boost)
    return (await runtime.start(spec)).id


def quota_writes(runtime: FakeRuntime) -> list[str]:
    return [call[0] for call in runtime.calls if call[0] in ("throttle", "unthrottle")]


async def test_an_idle_instance_is_throttled_after_the_delay_and_unthrottled_when_busy() -> None:
    runtime, timers = FakeRuntime(), FakeTimers()
    throttler = IdleThrottler(runtime, 0.1, timers)
    instance = await started(runtime)
    throttler.watch(instance, 1000)
    runtime.calls.clear()
    timers.advance(0.099)
    assert not runtime.instances[instance].throttled
    timers.advance(0.001)
    assert runtime.instances[instance].cpu_quota_us == THROTTLED_QUOTA_US
    throttler.busy(instance)
    assert runtime.instances[instance].cpu_quota_us == cpu_quota_us(1000, boost=False)
    assert quota_writes(runtime) == ["throttle", "unthrottle"]


@pytest.mark.parametrize(
    ("gaps", "writes"),
    [
        ([0.05, 0.05, 0.09], []),
        ([0.05, 0.2, 0.05], ["throttle", "unthrottle"]),
        ([0.2, 0.2], ["throttle", "unthrottle", "throttle", "unthrottle"]),
    ],
)
async def test_back_to_back_requests_write_no_quota_within_the_delay(
    gaps: list[float], writes: list[str]
) -> None:
    runtime, timers = FakeRuntime(), FakeTimers()
    throttler = IdleThrottler(runtime, 0.1, timers)
    instance = await started(runtime)
    throttler.watch(instance, 1000)
    runtime.calls.clear()
    throttler.busy(instance)
    for gap in gaps:
        throttler.idle(instance)
        timers.advance(gap)
        throttler.busy(instance)
    assert quota_writes(runtime) == writes


async def test_a_forgotten_instance_is_never_throttled() -> None:
    runtime, timers = FakeRuntime(), FakeTimers()
    throttler = IdleThrottler(runtime, 0.1, timers)
    instance = await started(runtime)
    throttler.watch(instance, 1000)
    runtime.calls.clear()
    throttler.forget(instance)
    throttler.idle(instance)
    timers.advance(1.0)
    assert quota_writes(runtime) == []


async def test_watching_a_boosted_instance_gives_it_its_normal_cpu_at_once() -> None:
    runtime, timers = FakeRuntime(), FakeTimers()
    throttler = IdleThrottler(runtime, 0.1, timers)
    instance = await started(runtime, cpu_boost=True)
    assert runtime.instances[instance].cpu_quota_us == cpu_quota_us(1000, boost=True)
    throttler.watch(instance, 1000)
    assert runtime.instances[instance].cpu_quota_us == cpu_quota_us(1000, boost=False)


def test_composed_hooks_call_both_in_order() -> None:
    heard: list[str] = []
    hook = compose_hooks(lambda b: heard.append("telemetry " + b), lambda b: heard.append(b))
    hook("i1")
    assert heard == ["telemetry i1", "i1"]
    assert compose_hooks(None, heard.append) == heard.append


# -- the reconciler -------------------------------------------------------------------------


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A local server: answers every HTTP request with 500 (a failing liveness endpoint)."""
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(1024)
        seen.append(request)
        if request:
            writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], seen
    server.close()
    await server.wait_closed()


def config(port: int, **changes: object) -> RevisionConfig:
    base = RevisionConfig(
        image="img",
        port=port,
        command=(),
        args=(),
        env=(),
        cpu_millis=1000,
        memory_bytes=2**29,
        container_concurrency=10,
        timeout_seconds=30,
        min_scale=0,
        max_scale=3,
        cpu_throttling=True,
        cpu_boost=True,
        annotations=(),
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def reconciler(runtime: FakeRuntime) -> Reconciler:
    return Reconciler(runtime, lambda *a, **k: None, ScalingPolicy(), throttle_delay=0.01)


class Lost(Ticket):
    def __init__(self) -> None:
        self.lost: list[str] = []

    def on_slot(self, backend: Backend) -> None:
        pass

    def on_backend_lost(self, reason: str) -> None:
        self.lost.append(reason)

    def on_refused(self, status: int, message: str) -> None:
        self.lost.append(f"{status} {message}")


async def until(condition: Callable[[], bool]) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never became true")


@pytest.mark.parametrize(
    ("concurrency", "max_scale", "limit"),
    [(10, 3, 300), (80, 100, 10_000), (1, 0, 1000), (0, 5, 10_000)],
)
async def test_the_queue_holds_ten_requests_per_slot_up_to_ten_thousand(
    concurrency: int, max_scale: int, limit: int
) -> None:
    scaler = reconciler(FakeRuntime())
    cfg = config(8080, container_concurrency=concurrency, max_scale=max_scale)
    endpoint = scaler.upsert("default", "svc", REVISION, cfg, "True")
    assert endpoint.queue_limit == limit


async def test_a_ready_instance_gets_its_normal_cpu_and_is_throttled_when_idle(
    listener: tuple[int, list[bytes]],
) -> None:
    port, _ = listener
    runtime = FakeRuntime(("127.0.0.1", port))
    scaler = reconciler(runtime)
    scaler.upsert("default", "svc", REVISION, config(port), "Unknown")
    await until(
        lambda: bool(runtime.instances) and quota_writes(runtime) == ["unthrottle", "throttle"]
    )
    (instance,) = runtime.instances.values()
    assert instance.spec.cpu_boost and instance.throttled
    await scaler.close()


async def test_a_revision_without_cpu_throttling_installs_no_hooks() -> None:
    scaler = reconciler(FakeRuntime())
    endpoint = scaler.upsert("default", "svc", REVISION, config(1, cpu_throttling=False), "True")
    assert endpoint.on_backend_busy is None and endpoint.on_backend_idle is None


async def test_liveness_failures_replace_the_instance_and_fail_its_requests(
    listener: tuple[int, list[bytes]],
) -> None:
    port, seen = listener
    runtime = FakeRuntime(("127.0.0.1", port))
    scaler = reconciler(runtime)
    live = ProbeSettings("http", port, "/live", 0.0, 1.0, 0.01, 3)
    endpoint = scaler.upsert(
        "default", "svc", REVISION, config(port, liveness_probe=live), "Unknown"
    )
    await until(lambda: len(endpoint.backends) == 1)
    first = next(iter(endpoint.backends))
    ticket = Lost()
    endpoint.submit(ticket)
    await until(lambda: first not in runtime.instances)
    assert ticket.lost == ["liveness probe (GET /live) failed 3 times in a row"]
    assert sum(1 for r in seen if r.startswith(b"GET /live ")) >= 3
    await until(lambda: len(endpoint.backends) == 1 and first not in endpoint.backends)
    await scaler.close()


async def test_a_crashed_instance_fails_its_requests_and_is_replaced(
    listener: tuple[int, list[bytes]],
) -> None:
    port, _ = listener
    runtime = FakeRuntime(("127.0.0.1", port))
    scaler = reconciler(runtime)
    endpoint = scaler.upsert("default", "svc", REVISION, config(port), "Unknown")
    await until(lambda: len(endpoint.backends) == 1)
    first = next(iter(endpoint.backends))
    ticket = Lost()
    endpoint.submit(ticket)
    runtime.exit(first, 137)
    scaler.instance_died(first, "exited with code 137")
    assert ticket.lost == ["exited with code 137"]
    await until(lambda: len(endpoint.backends) == 1 and first not in endpoint.backends)
    assert [c for c in runtime.calls if c[0] == "start"] == [("start", REVISION)] * 2
    await scaler.close()


async def test_a_queued_backlog_at_zero_starts_one_instance_alone_at_once() -> None:
    runtime = FakeRuntime()
    runtime.start_gate = asyncio.Event()  # starts hang: the instances stay "starting"
    scaler = reconciler(runtime)
    endpoint = scaler.upsert("default", "svc", REVISION, config(1, max_scale=3), "True")
    for _ in range(15):  # 15 waiting at 7 per instance (10 x 0.7) want 3; the first goes alone
        endpoint.submit(Lost())
    await until(lambda: len([c for c in runtime.calls if c[0] == "start"]) == 1)
    for _ in range(100):
        endpoint.submit(Lost())
    await asyncio.sleep(0.05)
    assert len([c for c in runtime.calls if c[0] == "start"]) == 1
    await scaler.close()


class SlowStarts(FakeRuntime):
    """Starts take 20 ms; notes the most cold starts the reconciler had in progress."""

    def __init__(self, address: tuple[str, int]) -> None:
        super().__init__(address)
        self.runs: Callable[[], list[RevisionRun]] = list
        self.peak = 0

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        self.peak = max([self.peak, *(run.starting for run in self.runs())])
        await asyncio.sleep(0.02)
        return await super().start(spec)


async def test_cold_starts_in_progress_never_exceed_the_reconcilers_limit(
    listener: tuple[int, list[bytes]],
) -> None:
    port, _ = listener
    runtime = SlowStarts(("127.0.0.1", port))
    scaler = Reconciler(runtime, lambda *a, **k: None, ScalingPolicy(), cold_starts=3)
    runtime.runs = scaler.revisions
    endpoint = scaler.upsert("default", "svc", REVISION, config(port, max_scale=12), "True")
    for _ in range(200):  # wants 12 at once; 1, then 2, then 3 at a time
        endpoint.submit(Lost())
    await until(lambda: len(endpoint.backends) == 12)
    assert runtime.peak == 3
    await scaler.close()


async def test_an_instance_that_becomes_ready_with_a_backlog_is_never_throttled(
    listener: tuple[int, list[bytes]],
) -> None:
    port, _ = listener
    runtime = FakeRuntime(("127.0.0.1", port))
    runtime.start_gate = asyncio.Event()
    scaler = reconciler(runtime)
    endpoint = scaler.upsert("default", "svc", REVISION, config(port, max_scale=1), "True")
    waiting = [Lost() for _ in range(3)]
    for ticket in waiting:
        endpoint.submit(ticket)
    runtime.start_gate.set()
    await until(lambda: endpoint.in_flight == 3)
    await asyncio.sleep(0.05)  # five times the throttle delay
    (instance,) = runtime.instances.values()
    assert not instance.throttled
    for ticket in waiting:
        endpoint.finish(ticket)
    await until(lambda: instance.throttled)
    await scaler.close()


@pytest.mark.parametrize(
    ("ready", "starting", "limit", "allowed"),
    [
        (0, 0, None, 1),  # at zero the first start goes alone
        (0, 1, None, 0),
        (1, 0, None, 2),
        (1, 1, None, 1),
        (3, 0, None, 6),
        (3, 4, None, 2),
        (10, 25, None, 0),
        (10, 0, 4, 4),  # the machine's limit caps the doubling
        (10, 3, 4, 1),
        (10, 6, 4, 0),  # over the limit (e.g. starts launched before it): none, never negative
        (0, 0, 4, 1),
    ],
)
def test_cold_starts_begin_alone_then_double_within_the_limit(
    ready: int, starting: int, limit: int | None, allowed: int
) -> None:
    assert starts_allowed(ready, starting, limit) == allowed


@pytest.mark.parametrize(("cpus", "limit"), [(0, 2), (1, 2), (2, 2), (3, 3), (16, 16)])
def test_cold_start_limit_is_one_per_cpu_and_at_least_two(cpus: int, limit: int) -> None:
    assert cold_start_limit(cpus) == limit


async def test_a_backlog_left_when_an_instance_is_ready_starts_the_next_round(
    listener: tuple[int, list[bytes]],
) -> None:
    port, _ = listener
    runtime = FakeRuntime(("127.0.0.1", port))
    scaler = reconciler(runtime)
    endpoint = scaler.upsert("default", "svc", REVISION, config(port, max_scale=5), "True")
    for _ in range(100):
        endpoint.submit(Lost())
    await until(lambda: len(endpoint.backends) == 5)
    await scaler.close()


async def test_a_revisions_knative_annotations_set_its_scaling_policy() -> None:
    annotations = (
        ("autoscaling.knative.dev/initial-scale", "0"),
        ("autoscaling.knative.dev/max-scale-down-rate", "4"),
        ("autoscaling.knative.dev/max-scale-up-rate", "10"),
        ("autoscaling.knative.dev/panic-threshold-percentage", "150"),
        ("autoscaling.knative.dev/panic-window-percentage", "20"),
        ("autoscaling.knative.dev/scale-down-delay", "30s"),
        ("autoscaling.knative.dev/target", "30"),
        ("autoscaling.knative.dev/target-utilization-percentage", "50"),
        ("autoscaling.knative.dev/window", "90s"),
    )
    scaler = reconciler(FakeRuntime())
    scaler.upsert("default", "svc", REVISION, config(1, annotations=annotations), "True")
    policy = scaler.revisions()[0].scaler.policy
    assert (policy.initial_scale, policy.max_scale_down_rate, policy.max_scale_up_rate) == (
        0,
        4.0,
        10.0,
    )
    assert (policy.panic_threshold_percentage, policy.panic_window_percentage) == (150.0, 20.0)
    assert (policy.scale_down_delay, policy.target, policy.target_utilization) == (30.0, 30.0, 0.5)
    assert policy.stable_window == 90.0


async def test_metrics_count_a_start_whose_container_does_not_exist_yet(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    runtime.start_gate = asyncio.Event()  # the engine has not created the container yet
    scaler = reconciler(runtime)
    scaler.upsert("default", "svc", REVISION, config(8080), "Unknown")
    await until(lambda: bool(runtime.calls))
    store = LogStore(tmp_path / "logs.db", 2**20)
    telemetry = Telemetry(store)
    telemetry.live_runs = scaler.revisions
    starting = f'cloudlet_instances{{service="svc",revision="{REVISION}",state="starting"}} 1'
    assert starting in telemetry.render_metrics()
    runtime.start_gate.set()
    await scaler.close()
    store.close()
