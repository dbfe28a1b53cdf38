"""The activator's slot logic, driven by a fake clock and a fake timer: no sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from cloudlet.dataplane.activator import (
    ACTIVE,
    DONE,
    QUEUED,
    Backend,
    RevisionEndpoint,
    Ticket,
    capacity_for,
    default_queue_limit,
    pick_backend,
)
from cloudlet.dataplane.upstream import UpstreamConnection


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeTimer:
    at: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTimers:
    clock: FakeClock
    timers: list[FakeTimer] = field(default_factory=list)

    def __call__(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.clock.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock, firing due timers in order."""
        target = self.clock.now + seconds
        while True:
            due = [t for t in self.timers if not t.cancelled and t.at <= target]
            if not due:
                break
            timer = min(due, key=lambda t: t.at)
            self.timers.remove(timer)
            self.clock.now = max(self.clock.now, timer.at)
            timer.callback()
        self.clock.now = target


class Rec(Ticket):
    """A ticket that records what the endpoint tells it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[tuple[str, object]] = []
        self.refusals: list[tuple[int, str]] = []

    def on_slot(self, backend: Backend) -> None:
        self.events.append(("slot", backend.id))

    def on_refused(self, status: int, message: str) -> None:
        self.events.append(("refused", (status, message)))
        self.refusals.append((status, message))

    def on_deadline(self) -> None:
        self.events.append(("deadline", None))

    def on_backend_lost(self, reason: str) -> None:
        self.events.append(("lost", reason))

    @property
    def slot(self) -> str | None:
        slots = [value for kind, value in self.events if kind == "slot"]
        return str(slots[-1]) if slots else None

    def __repr__(self) -> str:
        return f"Rec({self.name})"


@dataclass
class Harness:
    endpoint: RevisionEndpoint
    clock: FakeClock
    timers: FakeTimers
    demands: list[int]
    hooks: list[tuple[str, str]]


def make(
    cc: int = 2, timeout: float = 10.0, queue_limit: int | None = None, backends: int = 1
) -> Harness:
    clock = FakeClock()
    timers = FakeTimers(clock)
    demands: list[int] = []
    hooks: list[tuple[str, str]] = []
    endpoint = RevisionEndpoint(
        "hello",
        "hello-00001",
        container_concurrency=cc,
        timeout=timeout,
        queue_limit=queue_limit,
        on_demand=lambda ep: demands.append(ep.queued),
        clock=clock,
        call_later=timers,
    )
    endpoint.on_backend_busy = lambda b: hooks.append(("busy", b))
    endpoint.on_backend_idle = lambda b: hooks.append(("idle", b))
    endpoint.on_backend_error = lambda b: hooks.append(("error", b))
    for i in range(backends):
        endpoint.add_backend(f"i{i + 1}", "10.0.0.1", 8000 + i)
    return Harness(endpoint, clock, timers, demands, hooks)


def submit(h: Harness, *names: str) -> list[Rec]:
    tickets = [Rec(name) for name in names]
    for ticket in tickets:
        h.endpoint.submit(ticket)
    return tickets


# -- picking a backend --------------------------------------------------------------------------


def backend(name: str, in_flight: int, capacity: int = 4) -> Backend:
    b = Backend(name, "10.0.0.1", 8000, capacity)
    b.in_flight = in_flight
    return b


@pytest.mark.parametrize(
    ("loads", "start", "wanted"),
    [
        ([0], 0, "b0"),
        ([4], 0, None),  # full
        ([2, 1, 3], 0, "b1"),  # least in flight
        ([1, 1, 1], 0, "b0"),  # ties: from start on
        ([1, 1, 1], 1, "b1"),
        ([1, 1, 1], 5, "b2"),
        ([4, 4, 3], 0, "b2"),  # the only one with a free slot
        ([4, 4, 4], 0, None),
        ([], 0, None),
    ],
)
def test_pick_backend_takes_least_loaded_with_a_free_slot(
    loads: list[int], start: int, wanted: str | None
) -> None:
    backends = [backend(f"b{i}", load) for i, load in enumerate(loads)]
    picked = pick_backend(backends, start)
    assert (picked.id if picked else None) == wanted


def test_equal_loads_are_spread_round_robin() -> None:
    h = make(cc=10, backends=3)
    tickets = submit(h, *"abcdef")
    assert [t.slot for t in tickets] == ["i1", "i2", "i3", "i1", "i2", "i3"]


def test_unlimited_concurrency_means_1000_slots_and_the_queue_limit_is_capped() -> None:
    assert capacity_for(0) == 1000
    assert capacity_for(80) == 80
    assert default_queue_limit(1, 100) == 1000
    assert default_queue_limit(80, 100) == 10_000
    h = make(cc=0)
    assert h.endpoint.backends["i1"].capacity == 1000
    assert h.endpoint.queue_limit == 10_000


# -- slots and the queue ------------------------------------------------------------------------


def test_capacity_is_never_exceeded_and_extra_requests_wait_in_order() -> None:
    h = make(cc=2)
    a, b, c, d = submit(h, "a", "b", "c", "d")
    assert (a.slot, b.slot, c.slot, d.slot) == ("i1", "i1", None, None)
    assert h.endpoint.backends["i1"].in_flight == 2
    assert (h.endpoint.in_flight, h.endpoint.queued) == (2, 2)
    assert (c.state, d.state) == (QUEUED, QUEUED)


def test_a_released_slot_goes_to_the_oldest_waiter() -> None:
    h = make(cc=1)
    a, b, c = submit(h, "a", "b", "c")
    h.endpoint.finish(a)
    assert (b.slot, c.slot) == ("i1", None)
    h.endpoint.finish(b)
    assert c.slot == "i1"
    assert h.endpoint.backends["i1"].in_flight == 1
    assert h.endpoint.queued == 0


def test_a_waiter_that_leaves_frees_its_place() -> None:
    h = make(cc=1)
    a, b, c = submit(h, "a", "b", "c")
    h.endpoint.finish(b)  # the client went away
    assert b.state == DONE
    h.endpoint.finish(a)
    assert c.slot == "i1"
    assert b.slot is None


def test_enqueueing_tells_the_autoscaler_each_time() -> None:
    h = make(cc=1)
    submit(h, "a", "b", "c")
    assert h.demands == [1, 2]


def test_a_full_queue_refuses_with_503() -> None:
    h = make(cc=1, queue_limit=1)
    _, _, c = submit(h, "a", "b", "c")
    ((status, message),) = c.refusals
    assert status == 503
    assert "queue full" in message
    assert c.state == DONE
    assert h.endpoint.queued == 1


def test_zero_instances_queue_and_ask_for_one() -> None:
    h = make(backends=0)
    (a,) = submit(h, "a")
    assert a.state == QUEUED
    assert h.demands == [1]


def test_an_added_instance_serves_the_waiting_requests_in_order() -> None:
    h = make(cc=2, backends=0)
    tickets = submit(h, "a", "b", "c")
    h.endpoint.add_backend("i9", "10.0.0.9", 8080)
    assert [t.slot for t in tickets] == ["i9", "i9", None]
    assert h.endpoint.queued == 1


def test_more_capacity_serves_waiting_requests_at_once() -> None:
    h = make(cc=1)
    a, b, c = submit(h, "a", "b", "c")
    h.endpoint.configure(container_concurrency=3, timeout=10)
    assert (a.slot, b.slot, c.slot) == ("i1", "i1", "i1")


def test_adding_the_same_instance_twice_is_harmless_and_a_clash_is_refused() -> None:
    h = make()
    h.endpoint.add_backend("i1", "10.0.0.1", 8000)
    assert len(h.endpoint.backends) == 1
    with pytest.raises(ValueError, match="already registered"):
        h.endpoint.add_backend("i1", "10.0.0.2", 8000)


# -- timeouts -------------------------------------------------------------------------------------


def test_a_queued_request_gets_503_when_no_instance_comes_within_the_timeout() -> None:
    h = make(backends=0, timeout=5)
    (a,) = submit(h, "a")
    h.timers.advance(4.9)
    assert a.events == []
    h.timers.advance(0.2)
    assert a.events == [("refused", (503, "no instance became available within 5s"))]
    assert h.endpoint.queued == 0


def test_a_request_without_a_response_by_the_deadline_is_told_so() -> None:
    h = make(timeout=5)
    a, b = submit(h, "a", "b")
    h.endpoint.started(b)  # b's response began: it may stream on
    h.timers.advance(5.0)
    assert ("deadline", None) in a.events
    assert ("deadline", None) not in b.events


def test_deadlines_count_from_arrival_across_many_tickets() -> None:
    h = make(cc=10, timeout=3)
    (a,) = submit(h, "a")
    h.timers.advance(1)
    (b,) = submit(h, "b")
    h.timers.advance(2)
    assert ("deadline", None) in a.events
    assert b.events == [("slot", "i1")]
    h.timers.advance(1)
    assert ("deadline", None) in b.events


def test_a_shorter_timeout_applies_to_new_requests() -> None:
    h = make(cc=10, timeout=10)
    (a,) = submit(h, "a")
    h.endpoint.configure(container_concurrency=10, timeout=2)
    (b,) = submit(h, "b")
    h.timers.advance(2.5)
    assert ("deadline", None) in b.events
    assert ("deadline", None) not in a.events
    h.timers.advance(8)
    assert ("deadline", None) in a.events


def test_finished_requests_leave_no_timer_work() -> None:
    h = make(timeout=5)
    (a,) = submit(h, "a")
    h.endpoint.finish(a)
    h.timers.advance(10)
    assert a.events == [("slot", "i1")]


# -- instances going away -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_drain_resolves_when_the_last_request_finishes() -> None:
    h = make(cc=2, backends=2)
    a, _b = submit(h, "a", "b")  # one on each instance
    drained = h.endpoint.drain_backend("i1")
    assert not drained.done()
    (c,) = submit(h, "c")
    assert c.slot == "i2"  # a draining instance takes no new request
    h.endpoint.finish(a)
    assert drained.done()
    assert "i1" not in h.endpoint.backends


@pytest.mark.asyncio
async def test_draining_an_idle_instance_resolves_at_once_and_closes_its_pool() -> None:
    h = make()
    backend = h.endpoint.backends["i1"]
    pooled = UpstreamConnection(backend)
    backend.idle.append(pooled)
    drained = h.endpoint.drain_backend("i1")
    assert drained.done()
    assert pooled.closed
    assert backend.idle == []
    await asyncio.wait_for(drained, 1)


@pytest.mark.asyncio
async def test_draining_an_unknown_instance_resolves_at_once() -> None:
    h = make()
    assert h.endpoint.drain_backend("nope").done()


def test_removing_an_instance_fails_its_requests_at_once() -> None:
    h = make(cc=2, backends=2)
    a, b, c = submit(h, "a", "b", "c")
    h.endpoint.remove_backend("i1", "the container exited with code 137")
    assert ("lost", "the container exited with code 137") in a.events
    assert ("lost", "the container exited with code 137") in c.events
    assert b.events == [("slot", "i2")]
    assert (a.state, c.state) == (DONE, DONE)
    assert h.endpoint.in_flight == 1
    assert list(h.endpoint.backends) == ["i2"]


def test_removing_the_last_instance_keeps_waiters_and_asks_for_another() -> None:
    h = make(cc=1)
    _a, b = submit(h, "a", "b")
    h.endpoint.remove_backend("i1", "crashed")
    assert b.state == QUEUED
    assert h.demands == [1, 1]
    h.endpoint.add_backend("i2", "10.0.0.2", 8000)
    assert b.slot == "i2"


def test_closing_the_revision_refuses_waiters_and_later_requests() -> None:
    h = make(cc=1)
    a, b = submit(h, "a", "b")
    h.endpoint.close("deleted")
    assert [status for status, _ in b.refusals] == [503]
    (c,) = submit(h, "c")
    assert [status for status, _ in c.refusals] == [503]
    assert a.state == ACTIVE  # requests in flight finish


# -- observations and hooks ---------------------------------------------------------------------


def test_busy_and_idle_hooks_follow_the_first_and_last_request() -> None:
    h = make(cc=3)
    a, b = submit(h, "a", "b")
    assert h.hooks == [("busy", "i1")]
    h.endpoint.finish(a)
    assert h.hooks == [("busy", "i1")]
    h.endpoint.finish(b)
    assert h.hooks == [("busy", "i1"), ("idle", "i1")]
    h.endpoint.report_error("i1")
    assert h.hooks[-1] == ("error", "i1")


def test_a_slot_handed_to_a_waiter_does_not_flap_the_hooks() -> None:
    h = make(cc=1)
    a, _ = submit(h, "a", "b")
    h.endpoint.finish(a)
    assert h.hooks == [("busy", "i1")]


def test_concurrency_sample_is_time_weighted_over_in_flight_and_queued() -> None:
    h = make(cc=1)
    h.endpoint.take_concurrency_sample()
    a, _b = submit(h, "a", "b")  # 2 for 1 s
    h.clock.now += 1
    h.endpoint.finish(a)  # b takes the slot: 1 for 3 s
    h.clock.now += 3
    assert h.endpoint.take_concurrency_sample() == pytest.approx((2 * 1 + 1 * 3) / 4)
    h.clock.now += 2
    assert h.endpoint.take_concurrency_sample() == pytest.approx(1.0)
    assert h.endpoint.requests_total == 2


def test_invalid_settings_are_refused() -> None:
    h = make()
    with pytest.raises(ValueError, match="container_concurrency"):
        h.endpoint.configure(container_concurrency=-1, timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        h.endpoint.configure(container_concurrency=1, timeout=0)
