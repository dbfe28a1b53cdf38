"""CPU throttling of idle instances, as Cloud Run bills "CPU only during requests".

An instance whose last request finished is throttled ``delay`` seconds later (its CPU
quota cut to nearly nothing); the activator's busy hook, called before a request is
forwarded, unthrottles it first. The delay keeps a busy instance, whose in-flight count
touches zero between back-to-back requests, from paying a cgroup write pair per request.
Timers come from the injected ``call_later``, so tests drive time by hand.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from cloudlet.dataplane.activator import CallLater, TimerHandle
from cloudlet.runtimes.base import Runtime, RuntimeFailure

log = logging.getLogger("cloudlet.autoscaler")

IDLE_DELAY = 0.1
"""Seconds of no request in flight before an instance is throttled (docs/architecture.md)."""

Hook = Callable[[str], None]


def compose_hooks(first: Hook | None, second: Hook) -> Hook:
    """One hook calling ``first`` (if any, e.g. telemetry's) then ``second``."""
    if first is None:
        return second

    def both(backend_id: str) -> None:
        first(backend_id)
        second(backend_id)

    return both


class IdleThrottler:
    """Throttles the instances it watches when idle; unthrottles them when busy."""

    def __init__(
        self,
        runtime: Runtime,
        delay: float = IDLE_DELAY,
        call_later: CallLater | None = None,
    ) -> None:
        self._runtime = runtime
        self._delay = delay
        self._call_later = call_later
        self._cpu: dict[str, int] = {}  # watched instance -> its normal CPU (millis)
        self._timers: dict[str, TimerHandle] = {}
        self.throttled: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    def watch(self, instance_id: str, cpu_millis: int) -> None:
        """A ready instance with no request yet: its normal CPU now (ending a startup boost,
        or a throttle left by a previous server), throttled once idle long enough."""
        self._cpu[instance_id] = cpu_millis
        self.throttled.add(instance_id)
        self.busy(instance_id)
        self.idle(instance_id)

    def forget(self, instance_id: str) -> None:
        """The instance is leaving (drain, stop): no more timers or writes for it."""
        self._cpu.pop(instance_id, None)
        self.throttled.discard(instance_id)
        timer = self._timers.pop(instance_id, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Cancel every pending throttle (server shutdown; instances keep their CPU)."""
        for instance_id in list(self._cpu):
            self.forget(instance_id)

    def busy(self, instance_id: str) -> None:
        """A request is about to be forwarded: full CPU first (a ~13 µs cgroup write)."""
        timer = self._timers.pop(instance_id, None)
        if timer is not None:
            timer.cancel()
        if instance_id in self.throttled:
            self.throttled.discard(instance_id)
            cpu = self._cpu.get(instance_id, 1000)
            if not self._runtime.unthrottle_now(instance_id, cpu):
                self._spawn(self._runtime.unthrottle(instance_id, cpu))

    def idle(self, instance_id: str) -> None:
        """The last request in flight finished: arm the throttle timer."""
        if instance_id not in self._cpu or instance_id in self._timers:
            return
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timers[instance_id] = call_later(self._delay, lambda: self._expire(instance_id))

    def _expire(self, instance_id: str) -> None:
        self._timers.pop(instance_id, None)
        if instance_id not in self._cpu or instance_id in self.throttled:
            return
        self.throttled.add(instance_id)
        if not self._runtime.throttle_now(instance_id):
            self._spawn(self._runtime.throttle(instance_id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(_quietly(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _quietly(coro: Any) -> None:
    try:
        await coro
    except RuntimeFailure as error:  # the instance may be gone; the reconciler handles that
        log.debug("CPU quota change failed: %s", error.message)
