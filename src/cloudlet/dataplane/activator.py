"""The activator: concurrency slots on a revision's ready instances, and the queue before them.

A request holds a *ticket* from its arrival until its response is complete. The ticket gets a
slot on the least-loaded ready instance at once, or waits in a bounded FIFO queue (telling
the autoscaler, which starts an instance when there is none) until a slot frees up, an
instance is added, or the revision's timeout passes. A released slot goes straight to the
oldest waiter. Time comes from the injected clock and timers from the injected
``call_later``, so all of it runs without sockets in tests.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from cloudlet.dataplane.upstream import UpstreamConnection

UNLIMITED_CONCURRENCY = 1000
"""What ``containerConcurrency: 0`` ("unlimited") means here, as Cloud Run's maximum."""
QUEUE_LIMIT_CAP = 10_000
ASSUMED_MAX_INSTANCES = 100
"""Used for the default queue limit when the caller does not give one."""

NEW, QUEUED, ACTIVE, DONE = 0, 1, 2, 3


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], TimerHandle]


def capacity_for(container_concurrency: int) -> int:
    """Slots per instance for a ``containerConcurrency`` (0 means unlimited)."""
    return container_concurrency if container_concurrency > 0 else UNLIMITED_CONCURRENCY


def default_queue_limit(container_concurrency: int, max_instances: int) -> int:
    """Ten requests waiting per slot the revision can ever have, capped."""
    return min(10 * capacity_for(container_concurrency) * max_instances, QUEUE_LIMIT_CAP)


class Backend:
    """One ready instance: its address, slots, and idle keep-alive connections.

    ``idle`` is the pool the proxy takes connections from and returns them to; ``active``
    holds the tickets that have a slot here.
    """

    __slots__ = (
        "_drain_waiters",
        "active",
        "capacity",
        "draining",
        "host",
        "id",
        "idle",
        "in_flight",
        "port",
        "removed",
    )

    def __init__(self, backend_id: str, host: str, port: int, capacity: int) -> None:
        self.id = backend_id
        self.host = host
        self.port = port
        self.capacity = capacity
        self.in_flight = 0
        self.draining = False
        self.removed = False
        self.idle: list[UpstreamConnection] = []
        self.active: set[Ticket] = set()
        self._drain_waiters: list[asyncio.Future[None]] = []

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def __repr__(self) -> str:
        state = "removed" if self.removed else "draining" if self.draining else "ready"
        return (
            f"Backend({self.id!r}, {self.host}:{self.port}, "
            f"{self.in_flight}/{self.capacity}, {state})"
        )


class Ticket:
    """One request's claim on a revision; the proxy subclasses it.

    The endpoint calls exactly one of ``on_slot`` / ``on_refused`` after ``submit``, and
    after a slot, possibly ``on_deadline`` (no response started in time) or
    ``on_backend_lost`` (the instance was removed). The owner calls ``finish`` when done.
    Fields start as class-level defaults, so a subclass needs no ``super().__init__()``
    (one call less per request).
    """

    state: int = NEW
    deadline: float = 0.0
    backend: Backend | None = None

    def on_slot(self, backend: Backend) -> None:
        raise NotImplementedError

    def on_refused(self, status: int, message: str) -> None:
        raise NotImplementedError

    def on_deadline(self) -> None:
        raise NotImplementedError

    def on_backend_lost(self, reason: str) -> None:
        raise NotImplementedError


def pick_backend(backends: Sequence[Backend], start: int) -> Backend | None:
    """The backend with a free slot and the fewest requests in flight.

    Ties go to the first one found from index ``start`` on, so a caller that advances
    ``start`` on every pick spreads equal loads round robin.
    """
    n = len(backends)
    if n == 1:
        only = backends[0]
        return only if only.in_flight < only.capacity else None
    best: Backend | None = None
    best_load = 0
    for i in range(n):
        candidate = backends[(start + i) % n]
        load = candidate.in_flight
        if load < candidate.capacity and (best is None or load < best_load):
            best = candidate
            best_load = load
    return best


def _loop_call_later(delay: float, callback: Callable[[], None]) -> TimerHandle:
    return asyncio.get_running_loop().call_later(delay, callback)


class RevisionEndpoint:
    """The activator of one revision: its ready instances, slots and waiting requests.

    Tickets wait in ``_awaiting``, a dict in arrival order (deadline order, as the timeout
    is the same for all), from ``submit`` until their response starts; one timer for the
    earliest deadline serves them all. Adding and removing cost a dict operation each.
    """

    def __init__(
        self,
        service: str,
        revision: str,
        *,
        container_concurrency: int,
        timeout: float,
        queue_limit: int | None = None,
        on_demand: Callable[[RevisionEndpoint], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        call_later: CallLater | None = None,
    ) -> None:
        self.service = service
        self.revision = revision
        self.on_demand = on_demand
        self.on_backend_busy: Callable[[str], None] | None = None
        self.on_backend_idle: Callable[[str], None] | None = None
        self.on_backend_error: Callable[[str], None] | None = None
        self.in_flight = 0
        self.queued = 0
        self.requests_total = 0
        self._clock = clock
        self._call_later = call_later or _loop_call_later
        self._backends: dict[str, Backend] = {}
        self.backends: Mapping[str, Backend] = MappingProxyType(self._backends)
        self._ready: list[Backend] = []
        self._rr = 0
        self._waiters: OrderedDict[Ticket, None] = OrderedDict()
        self._closed: str | None = None
        self._awaiting: dict[Ticket, None] = {}
        self._unsorted = False
        self._timer: TimerHandle | None = None
        self._timer_at = 0.0
        now = clock()
        # Little's law bookkeeping for take_concurrency_sample: times are relative to the
        # sample's start; an arrival subtracts its time, a departure adds its time.
        self._sample_since = now
        self._presence = 0.0
        self._container_concurrency = 0
        self._capacity = 0
        self._timeout = 0.0
        self._queue_limit = 0
        self.configure(
            container_concurrency=container_concurrency, timeout=timeout, queue_limit=queue_limit
        )

    def __repr__(self) -> str:
        return f"RevisionEndpoint({self.service!r}, {self.revision!r})"

    # -- settings ---------------------------------------------------------------------------

    @property
    def container_concurrency(self) -> int:
        return self._container_concurrency

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def queue_limit(self) -> int:
        return self._queue_limit

    def configure(
        self, *, container_concurrency: int, timeout: float, queue_limit: int | None = None
    ) -> None:
        """Change the revision's limits; more capacity serves waiting requests at once."""
        if container_concurrency < 0:
            raise ValueError("container_concurrency must be >= 0 (0 means unlimited)")
        if timeout <= 0:
            raise ValueError("timeout must be > 0 seconds")
        if queue_limit is not None and queue_limit < 0:
            raise ValueError("queue_limit must be >= 0")
        if timeout < self._timeout and self._awaiting:
            self._unsorted = True  # older tickets now expire after newer ones
        self._container_concurrency = container_concurrency
        self._capacity = capacity_for(container_concurrency)
        self._timeout = float(timeout)
        self._queue_limit = (
            default_queue_limit(container_concurrency, ASSUMED_MAX_INSTANCES)
            if queue_limit is None
            else queue_limit
        )
        for backend in self._backends.values():
            backend.capacity = self._capacity
        self._dispatch_waiters()

    # -- instances ----------------------------------------------------------------------------

    def add_backend(self, backend_id: str, host: str, port: int) -> None:
        """An instance is ready: send it requests, starting with the waiting ones."""
        existing = self._backends.get(backend_id)
        if existing is not None:
            if not existing.draining and (existing.host, existing.port) == (host, port):
                return
            raise ValueError(f"instance {backend_id!r} is already registered")
        backend = Backend(backend_id, host, port, self._capacity)
        self._backends[backend_id] = backend
        self._ready.append(backend)
        self._dispatch_waiters()

    def drain_backend(self, backend_id: str) -> asyncio.Future[None]:
        """Send the instance no new requests; resolves once none is in flight there.

        Its idle pooled connections are closed now, and the instance is forgotten once
        drained.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        backend = self._backends.get(backend_id)
        if backend is None:
            done.set_result(None)
            return done
        self._stop_using(backend)
        if backend.in_flight == 0:
            self._forget(backend)
            done.set_result(None)
        else:
            backend._drain_waiters.append(done)
        return done

    def remove_backend(self, backend_id: str, reason: str) -> None:
        """The instance is gone: its in-flight requests fail at once, connections close."""
        backend = self._backends.get(backend_id)
        if backend is None:
            return
        self._stop_using(backend)
        backend.removed = True
        for ticket in list(backend.active):
            ticket.on_backend_lost(reason)
            self.finish(ticket)
        self._forget(backend)
        if self._waiters and not self._ready and self.on_demand is not None:
            self.on_demand(self)

    def _stop_using(self, backend: Backend) -> None:
        if not backend.draining:
            backend.draining = True
            self._ready.remove(backend)
        backend.close_idle()

    def _forget(self, backend: Backend) -> None:
        self._backends.pop(backend.id, None)
        waiters, backend._drain_waiters = backend._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self, reason: str) -> None:
        """The revision is deleted: waiting and later requests get 503."""
        self._closed = f"revision {self.revision} is no longer serving: {reason}"
        while self._waiters:
            ticket, _ = self._waiters.popitem(last=False)
            self._refuse_queued(ticket, self._closed)

    # -- the request path -----------------------------------------------------------------------

    def submit(self, ticket: Ticket) -> None:
        """A request arrives: a slot now (``on_slot``), a place in the queue, or a refusal."""
        now = self._clock()
        self.requests_total += 1
        if self._closed is not None:
            ticket.state = DONE
            ticket.on_refused(503, self._closed)
            return
        ready = self._ready
        if len(ready) == 1:  # the common case, without a call
            only = ready[0]
            backend = only if only.in_flight < only.capacity else None
        else:
            backend = pick_backend(ready, self._rr)
            self._rr += 1
        if backend is None and self.queued >= self._queue_limit:
            ticket.state = DONE
            ticket.on_refused(
                503,
                f"queue full: {self.queued} requests are already waiting for an instance of "
                f"revision {self.revision}",
            )
            return
        ticket.deadline = now + self._timeout
        self._awaiting[ticket] = None
        if self._timer is None or ticket.deadline < self._timer_at:
            self._arm(ticket.deadline)
        self._presence -= now - self._sample_since
        if backend is not None:  # _grant, inlined for the hot path
            backend.in_flight += 1
            self.in_flight += 1
            backend.active.add(ticket)
            ticket.backend = backend
            ticket.state = ACTIVE
            if backend.in_flight == 1 and self.on_backend_busy is not None:
                self.on_backend_busy(backend.id)
            ticket.on_slot(backend)
            return
        ticket.state = QUEUED
        self._waiters[ticket] = None
        self.queued += 1
        if self.on_demand is not None:
            self.on_demand(self)

    def started(self, ticket: Ticket) -> None:
        """The response began: the timeout no longer applies to this ticket."""
        self._awaiting.pop(ticket, None)

    def finish(self, ticket: Ticket) -> None:
        """The request is over (any outcome): free its slot or its place in the queue."""
        state = ticket.state
        if state == DONE:
            return
        ticket.state = DONE
        self._awaiting.pop(ticket, None)
        if state == ACTIVE:
            backend = ticket.backend
            assert backend is not None
            if self._waiters or backend.in_flight == 1 or backend.draining:
                self._release(ticket, backend)
                return
            # _release without waiters, hooks or draining: the hot path
            self._presence += self._clock() - self._sample_since
            backend.active.discard(ticket)
            backend.in_flight -= 1
            self.in_flight -= 1
        elif state == QUEUED:
            self._departed()
            del self._waiters[ticket]
            self.queued -= 1

    def report_error(self, backend_id: str) -> None:
        """A connect or I/O error on that instance (the autoscaler checks on it)."""
        if self.on_backend_error is not None:
            self.on_backend_error(backend_id)

    def _grant(self, ticket: Ticket, backend: Backend) -> None:
        backend.in_flight += 1
        self.in_flight += 1
        backend.active.add(ticket)
        ticket.backend = backend
        ticket.state = ACTIVE
        if backend.in_flight == 1 and self.on_backend_busy is not None:
            self.on_backend_busy(backend.id)
        ticket.on_slot(backend)

    def _release(self, ticket: Ticket, backend: Backend) -> None:
        self._departed()
        backend.active.discard(ticket)
        if self._waiters and not backend.draining and backend.in_flight <= backend.capacity:
            waiter, _ = self._waiters.popitem(last=False)
            self.queued -= 1
            backend.active.add(waiter)
            waiter.backend = backend
            waiter.state = ACTIVE
            waiter.on_slot(backend)  # the slot changes hands: in_flight stays
            return
        backend.in_flight -= 1
        self.in_flight -= 1
        if backend.in_flight == 0:
            if self.on_backend_idle is not None:
                self.on_backend_idle(backend.id)
            if backend.draining and not backend.removed:
                self._forget(backend)

    def _dispatch_waiters(self) -> None:
        while self._waiters and self._ready:
            backend = pick_backend(self._ready, self._rr)
            if backend is None:
                return
            self._rr += 1
            ticket, _ = self._waiters.popitem(last=False)
            self.queued -= 1
            self._grant(ticket, backend)

    def _refuse_queued(self, ticket: Ticket, message: str) -> None:
        self._departed()
        self.queued -= 1
        ticket.state = DONE
        self._awaiting.pop(ticket, None)
        ticket.on_refused(503, message)

    # -- deadlines ------------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        if self._timer is not None:
            if self._timer_at <= deadline:
                return
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._call_later(max(0.0, deadline - self._clock()), self.expire_due)

    def expire_due(self) -> None:
        """Fail the tickets whose deadline has passed; the timer calls this."""
        self._timer = None
        now = self._clock()
        expired: list[Ticket] = []
        for ticket in self._awaiting:
            if ticket.deadline <= now:
                expired.append(ticket)
            elif not self._unsorted:
                break
        for ticket in expired:
            if ticket in self._awaiting:  # not started or finished meanwhile
                del self._awaiting[ticket]
                self._expire(ticket)
        if not self._awaiting:
            self._unsorted = False
        elif self._timer is None:
            self._arm(
                min(t.deadline for t in self._awaiting)
                if self._unsorted
                else next(iter(self._awaiting)).deadline
            )

    def _expire(self, ticket: Ticket) -> None:
        if ticket.state == QUEUED:
            del self._waiters[ticket]
            self._refuse_queued(ticket, f"no instance became available within {self._timeout:g}s")
        elif ticket.state == ACTIVE:
            ticket.on_deadline()

    # -- observations for the autoscaler ------------------------------------------------------

    def _departed(self) -> None:
        self._presence += self._clock() - self._sample_since

    def take_concurrency_sample(self) -> float:
        """Time-weighted average of in-flight plus queued requests since the last call."""
        now = self._clock()
        span = now - self._sample_since
        level = self.in_flight + self.queued
        average = (self._presence + level * span) / span if span > 0 else float(level)
        self._presence = 0.0
        self._sample_since = now
        return average
