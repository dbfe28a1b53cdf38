"""An in-memory runtime for testing the code above the runtime seam (autoscaler, activator).

It starts nothing: ``start`` hands back an address the test chose, every call is recorded
in order, and the test decides when an instance dies (``exit``), what it logs (``write``)
and whether starts fail or hang (``fail_next_start``, ``start_gate``).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from cloudlet.runtimes.base import (
    ExitState,
    ImageNotFound,
    InstanceEvent,
    InstanceInfo,
    InstanceSpec,
    LogLine,
    RuntimeFailure,
)
from cloudlet.runtimes.docker import THROTTLED_QUOTA_US, cpu_quota_us

AddressFactory = Callable[[InstanceSpec, int], tuple[str, int]]


@dataclass
class FakeInstance:
    """What the fake knows about one instance; tests may read it freely."""

    info: InstanceInfo
    spec: InstanceSpec
    cpu_quota_us: int
    exit: ExitState = field(default_factory=lambda: ExitState(running=True))
    logs: list[LogLine] = field(default_factory=list)
    stopped_with_grace: float | None = None

    @property
    def throttled(self) -> bool:
        return self.cpu_quota_us == THROTTLED_QUOTA_US


class FakeRuntime:
    """The ``Runtime`` protocol in memory.

    ``address`` is where every instance listens (a test server, say); ``address_factory``
    instead picks one per start from the spec and a sequence number. ``missing_images``
    makes ``ensure_image`` and ``start`` raise ImageNotFound for those names.
    """

    def __init__(
        self,
        address: tuple[str, int] = ("127.0.0.1", 8080),
        *,
        address_factory: AddressFactory | None = None,
        missing_images: set[str] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._address_factory = address_factory or (lambda _spec, _n: address)
        self.missing_images = set(missing_images or ())
        self._clock = clock
        self.calls: list[tuple[str, ...]] = []
        self.instances: dict[str, FakeInstance] = {}
        self.fail_next_start: RuntimeFailure | None = None
        # When set, starts wait for it: lets a test observe a cold start in progress.
        self.start_gate: asyncio.Event | None = None
        self._serial = itertools.count(1)
        self._subscribers: list[asyncio.Queue[InstanceEvent]] = []
        # Every event with its Unix time, replayed to subscribers that pass ``since``.
        self.history: list[tuple[float, InstanceEvent]] = []
        self._log_waiters: dict[str, asyncio.Event] = {}

    # -- what tests drive -----------------------------------------------------------------

    def exit(self, instance_id: str, exit_code: int = 1, *, oom: bool = False) -> None:
        """The instance's process ends; event subscribers hear of it as from Docker."""
        instance = self.instances[instance_id]
        instance.exit = ExitState(running=False, exit_code=exit_code, oom_killed=oom)
        if oom:
            self._publish(InstanceEvent(instance_id, "oom", None))
        self._publish(InstanceEvent(instance_id, "die", exit_code))
        self._wake_log_readers(instance_id)

    def write(
        self, instance_id: str, line: str, stream: Literal["stdout", "stderr"] = "stdout"
    ) -> None:
        """The instance writes one line of output."""
        self.instances[instance_id].logs.append(LogLine(stream, line, self._clock()))
        self._wake_log_readers(instance_id)

    def running(self) -> list[FakeInstance]:
        return [i for i in self.instances.values() if i.exit.running]

    # -- the Runtime protocol -------------------------------------------------------------

    async def ensure_image(self, image: str) -> str:
        self.calls.append(("ensure_image", image))
        self._check_image(image)
        return "sha256:" + hashlib.sha256(image.encode()).hexdigest()

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        self.calls.append(("start", spec.revision))
        if self.start_gate is not None:
            await self.start_gate.wait()
        self._check_image(spec.image)
        if (failure := self.fail_next_start) is not None:
            self.fail_next_start = None
            raise failure
        return self._add_instance(spec, next(self._serial))

    async def state(self, instance_id: str) -> ExitState:
        self.calls.append(("state", instance_id))
        instance = self.instances.get(instance_id)
        if instance is None:
            return ExitState(running=False, error=f"container {instance_id} no longer exists")
        return instance.exit

    async def logs_tail(self, instance_id: str, lines: int = 20) -> str:
        self.calls.append(("logs_tail", instance_id))
        instance = self.instances.get(instance_id)
        tail = instance.logs[-lines:] if instance and lines > 0 else []
        return "".join(f"{entry.line}\n" for entry in tail)

    async def stop(self, instance_id: str, grace_seconds: float = 10.0) -> None:
        self.calls.append(("stop", instance_id))
        instance = self.instances.pop(instance_id, None)
        if instance is not None and instance.exit.running:
            instance.stopped_with_grace = grace_seconds
            instance.exit = ExitState(running=False, exit_code=143)  # 128 + SIGTERM
            self._publish(InstanceEvent(instance_id, "die", 143))
            self._wake_log_readers(instance_id)

    async def throttle(self, instance_id: str) -> None:
        if not self.throttle_now(instance_id):
            raise RuntimeFailure(f"no such container: {instance_id}")

    async def unthrottle(self, instance_id: str, cpu_millis: int) -> None:
        if not self.unthrottle_now(instance_id, cpu_millis):
            raise RuntimeFailure(f"no such container: {instance_id}")

    def throttle_now(self, instance_id: str) -> bool:
        self.calls.append(("throttle", instance_id))
        return self._set_quota(instance_id, THROTTLED_QUOTA_US)

    def unthrottle_now(self, instance_id: str, cpu_millis: int) -> bool:
        self.calls.append(("unthrottle", instance_id))
        return self._set_quota(instance_id, cpu_quota_us(cpu_millis, boost=False))

    async def list_instances(self) -> list[InstanceInfo]:
        self.calls.append(("list_instances",))
        return [instance.info for instance in self.running()]

    async def events(self, since: float | None = None) -> AsyncGenerator[InstanceEvent, None]:
        queue: asyncio.Queue[InstanceEvent] = asyncio.Queue()
        replay_from = float("inf") if since is None else since
        for when, event in self.history:
            if when >= replay_from:
                queue.put_nowait(event)
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def stream_logs(self, instance_id: str) -> AsyncGenerator[LogLine, None]:
        sent = 0
        while (instance := self.instances.get(instance_id)) is not None:
            while sent < len(instance.logs):
                yield instance.logs[sent]
                sent += 1
            if not instance.exit.running:
                return
            waiter = self._log_waiters.setdefault(instance_id, asyncio.Event())
            await waiter.wait()

    async def close(self) -> None:
        self.calls.append(("close",))

    # -- helpers --------------------------------------------------------------------------

    def _check_image(self, image: str) -> None:
        if image in self.missing_images:
            raise ImageNotFound(f"image {image} is not in the fake runtime", field="image")

    def _add_instance(self, spec: InstanceSpec, serial: int) -> InstanceInfo:
        host, port = self._address_factory(spec, serial)
        info = InstanceInfo(
            id=f"fake-{spec.revision}-{serial}",
            service=spec.service,
            revision=spec.revision,
            host=host,
            port=port,
            labels=dict(spec.labels),
        )
        quota = cpu_quota_us(spec.cpu_millis, boost=spec.cpu_boost)
        self.instances[info.id] = FakeInstance(info=info, spec=spec, cpu_quota_us=quota)
        return info

    def _set_quota(self, instance_id: str, quota_us: int) -> bool:
        instance = self.instances.get(instance_id)
        if instance is None:
            return False
        instance.cpu_quota_us = quota_us
        return True

    def _publish(self, event: InstanceEvent) -> None:
        self.history.append((self._clock().timestamp(), event))
        for queue in self._subscribers:
            queue.put_nowait(event)

    def _wake_log_readers(self, instance_id: str) -> None:
        waiter = self._log_waiters.pop(instance_id, None)
        if waiter is not None:
            waiter.set()
