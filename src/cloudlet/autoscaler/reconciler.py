"""The reconcile loop: samples concurrency each second, decides every two, and starts,
drains and stops instances so each revision runs what the decider wants."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cloudlet.autoscaler.probe import (
    Check,
    InstanceFailed,
    check_for,
    startup,
    until_unhealthy,
    wait_ready,
)
from cloudlet.autoscaler.throttle import IDLE_DELAY, IdleThrottler, compose_hooks
from cloudlet.dataplane.activator import (
    ASSUMED_MAX_INSTANCES,
    RevisionEndpoint,
    default_queue_limit,
)
from cloudlet.domain.autoscale import (
    Scaler,
    ScalingPolicy,
    cold_start_limit,
    initial_instances,
    instances_for_backlog,
    policy_from_annotations,
    starts_allowed,
)
from cloudlet.domain.probes import ProbeSettings, default_startup_probe
from cloudlet.domain.revision import RevisionConfig
from cloudlet.runtimes.base import InstanceInfo, InstanceSpec, Runtime, RuntimeFailure

log = logging.getLogger("cloudlet.autoscaler")
ADOPT_TIMEOUT = 5.0
MAX_BACKOFF = 30.0


class StatusReporter(Protocol):
    def __call__(
        self,
        namespace: str,
        name: str,
        ready: str,
        reason: str = "",
        message: str = "",
        image_digest: str | None = None,
    ) -> None: ...


@dataclass
class Instance:
    info: InstanceInfo
    state: str = "starting"  # starting | ready | draining
    started_at: float = 0.0
    liveness: asyncio.Task[None] | None = None


class InstanceObserver(Protocol):
    """Told of instance lifecycles and scale decisions (telemetry: logs, meter, metrics).

    Calls are synchronous and must not raise or block."""

    def revision_added(self, run: RevisionRun) -> None: ...

    def revision_ready(self, run: RevisionRun) -> None: ...

    def instance_started(self, run: RevisionRun, info: InstanceInfo) -> None: ...

    def instance_ready(self, run: RevisionRun, info: InstanceInfo, startup: float) -> None: ...

    def instance_stopping(self, run: RevisionRun, instance_id: str, reason: str) -> None: ...

    def instance_stopped(self, run: RevisionRun, instance_id: str, reason: str) -> None: ...

    def scaled(self, run: RevisionRun, current: int, desired: int, reason: str) -> None: ...


@dataclass
class RevisionRun:
    """What the reconciler keeps for one revision."""

    namespace: str
    service: str
    name: str
    config: RevisionConfig
    endpoint: RevisionEndpoint
    scaler: Scaler
    status: str  # Unknown (deploying) | True | False
    instances: dict[str, Instance] = field(default_factory=dict)
    starting: int = 0
    failures: int = 0
    next_start: float = 0.0
    image_id: str | None = None
    """The image's immutable id, resolved when the revision was created; instances start
    from it, so retagging the image later does not change what an old revision runs."""

    def ready(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state == "ready"]

    def spec(self) -> InstanceSpec:
        c = self.config
        return InstanceSpec(
            service=self.service,
            revision=self.name,
            configuration=self.service,
            image=self.image_id or c.image,
            port=c.port,
            command=c.command,
            args=c.args,
            env=c.env,
            cpu_millis=c.cpu_millis,
            memory_bytes=c.memory_bytes,
            cpu_boost=c.cpu_boost,
            labels=(("cloudlet.namespace", self.namespace),),
        )


class Reconciler:
    """Owns every instance of every revision on this server."""

    def __init__(
        self,
        runtime: Runtime,
        report: StatusReporter,
        defaults: ScalingPolicy,
        *,
        shutdown_grace: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sample_interval: float = 1.0,
        decide_interval: float = 2.0,
        observer: InstanceObserver | None = None,
        throttle_delay: float = IDLE_DELAY,
        cold_starts: int | None = None,
    ) -> None:
        self._observer = observer
        self._cold_starts = cold_starts or cold_start_limit(_usable_cpus())
        """Most cold starts in progress at once per revision (``starts_allowed``)."""
        self.prepare: Callable[[str, InstanceSpec], InstanceSpec] = lambda _ns, spec: spec
        """Completes an instance's spec just before it starts (the server fills in secrets)."""
        self._runtime = runtime
        self._report = report
        self._defaults = defaults
        self._grace = shutdown_grace
        self._clock = clock
        self._sample_interval = sample_interval
        self._decide_interval = decide_interval
        self._revisions: dict[str, RevisionRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.throttler = IdleThrottler(runtime, throttle_delay)

    # -- revisions known to the control plane -------------------------------------------

    def endpoint(self, name: str) -> RevisionEndpoint | None:
        run = self._revisions.get(name)
        return run.endpoint if run else None

    def revisions(self) -> list[RevisionRun]:
        return list(self._revisions.values())

    def upsert(
        self,
        namespace: str,
        service: str,
        name: str,
        config: RevisionConfig,
        status: str,
        image_id: str | None = None,
    ) -> RevisionEndpoint:
        """Know about a revision (idempotent); a new deploying one gets its first instance."""
        run = self._revisions.get(name)
        if run is not None:
            run.image_id = run.image_id or image_id
            if status != "Unknown" or run.status != "Unknown":
                run.status = status if run.status != "False" else run.status
            return run.endpoint
        policy = self._policy(config)
        endpoint = RevisionEndpoint(
            service,
            name,
            container_concurrency=config.container_concurrency,
            timeout=float(config.timeout_seconds),
            queue_limit=default_queue_limit(
                config.container_concurrency, config.max_scale or ASSUMED_MAX_INSTANCES
            ),
            on_demand=self._on_demand,
        )
        if config.cpu_throttling:
            self._install_throttling(endpoint)
        run = RevisionRun(
            namespace, service, name, config, endpoint, Scaler(policy, self._clock()), status
        )
        run.image_id = image_id
        self._revisions[name] = run
        if self._observer is not None:
            self._observer.revision_added(run)
        if status == "Unknown":
            self._spawn(self._deploy(run))
        return endpoint

    def _install_throttling(self, endpoint: RevisionEndpoint) -> None:
        """Idle instances of this revision lose their CPU (composed with other hooks)."""
        endpoint.on_backend_busy = compose_hooks(endpoint.on_backend_busy, self.throttler.busy)
        endpoint.on_backend_idle = compose_hooks(endpoint.on_backend_idle, self.throttler.idle)

    def _policy(self, config: RevisionConfig) -> ScalingPolicy:
        defaults = replace(
            self._defaults,
            container_concurrency=config.container_concurrency,
            min_scale=config.min_scale,
            max_scale=config.max_scale,
        )
        return policy_from_annotations(
            dict(config.annotations), config.container_concurrency, defaults
        )

    def remove(self, name: str) -> None:
        """The revision was deleted: drain and stop its instances."""
        run = self._revisions.pop(name, None)
        if run is None:
            return
        run.endpoint.close(f"revision {name} was deleted")
        for instance in list(run.instances.values()):
            self._spawn(self._retire(run, instance, "revision deleted"))

    # -- starting instances -------------------------------------------------------------------

    async def _deploy(self, run: RevisionRun) -> None:
        """First instances of a new revision; its verdict becomes the revision's status."""
        try:
            digest = await self._runtime.ensure_image(run.config.image)
        except RuntimeFailure as error:
            self._fail(
                run, "ContainerMissing" if error.user_fault else "RuntimeFailure", error.message
            )
            return
        run.image_id = digest
        count = max(1, initial_instances(run.scaler.policy))
        results = await asyncio.gather(*(self._start(run) for _ in range(count)))
        if run.status == "Unknown" and any(results):
            run.status = "True"
            self._report(run.namespace, run.name, "True", image_digest=digest)
            if self._observer is not None:
                self._observer.revision_ready(run)

    def _fail(self, run: RevisionRun, reason: str, message: str) -> None:
        log.warning("revision %s failed: %s", run.name, message)
        run.status = "False"
        self._report(run.namespace, run.name, "False", reason, message)

    def _launch(self, run: RevisionRun) -> None:
        """Start an instance in the background, counted as starting from now on."""
        run.starting += 1
        self._spawn(self._start(run, reserved=True))

    async def _start(self, run: RevisionRun, reserved: bool = False) -> bool:
        """Start one instance and add it to the endpoint once its port accepts."""
        if not reserved:
            run.starting += 1
        try:
            started_at = self._clock()
            info = await self._runtime.start(self.prepare(run.namespace, run.spec()))
            instance = Instance(info, started_at=started_at)
            run.instances[info.id] = instance
            if self._observer is not None:
                self._observer.instance_started(run, info)
            probe = run.config.startup_probe or default_startup_probe(run.config.port)
            await startup(self._runtime, info, probe)
        except (RuntimeFailure, InstanceFailed) as error:
            await self._start_failed(run, error, locals().get("info"))
            return False
        finally:
            run.starting -= 1
        return self._became_ready(run, instance)

    async def _start_failed(
        self, run: RevisionRun, error: Exception, info: InstanceInfo | None
    ) -> None:
        reason = getattr(error, "reason", "RuntimeFailure")
        message = getattr(error, "message", str(error))
        if info is not None:
            run.instances.pop(info.id, None)
            with contextlib.suppress(RuntimeFailure):
                await self._runtime.stop(info.id, 0)
            if self._observer is not None:
                self._observer.instance_stopped(run, info.id, f"failed to start: {message}")
        run.failures += 1
        run.next_start = self._clock() + min(MAX_BACKOFF, 2.0**run.failures)
        if run.status == "Unknown":
            self._fail(run, reason, message)
        else:
            log.warning("instance of %s failed to start: %s", run.name, message)

    def _became_ready(self, run: RevisionRun, instance: Instance) -> bool:
        if self._revisions.get(run.name) is not run or instance.info.id not in run.instances:
            self._spawn(self._stop(instance.info.id, run, "revision no longer serving"))
            return False
        instance.state = "ready"
        run.failures = 0
        # watched before it is added: queued requests dispatched by add_backend then cancel
        # the idle timer through the busy hook, so a busy instance is never throttled
        if run.config.cpu_throttling:  # sets the normal CPU now, which ends a boost
            self.throttler.watch(instance.info.id, run.config.cpu_millis)
        elif run.config.cpu_boost:  # created with double CPU: back to the limit once ready
            self._spawn(self._runtime.unthrottle(instance.info.id, run.config.cpu_millis))
        run.endpoint.add_backend(instance.info.id, instance.info.host, instance.info.port)
        if run.endpoint.queued:  # a backlog left: the next round of starts may begin
            self._on_demand(run.endpoint)
        if run.config.liveness_probe is not None:
            instance.liveness = self._spawn(self._watch_liveness(run, instance))
        log.info("instance %s of %s ready", instance.info.id[:12], run.name)
        if self._observer is not None:
            startup = self._clock() - instance.started_at
            self._observer.instance_ready(run, instance.info, startup)
        return True

    def _on_demand(self, endpoint: RevisionEndpoint) -> None:
        """A request is waiting for a slot: start now the instances the backlog needs
        (at least one), without waiting for the next decision."""
        run = self._revisions.get(endpoint.revision)
        if run is None or run.status == "False" or self._clock() < run.next_start:
            return
        policy = run.scaler.policy
        wanted = instances_for_backlog(policy, endpoint.in_flight, endpoint.queued)
        ready = len(run.ready())
        coming = ready + run.starting
        draining = sum(1 for i in run.instances.values() if i.state == "draining")
        room = (policy.max_scale or 10**6) - coming - draining
        for _ in range(min(wanted - coming, room, self._starts_allowed(ready, run))):
            self._launch(run)

    def _starts_allowed(self, ready: int, run: RevisionRun) -> int:
        return starts_allowed(ready, run.starting, self._cold_starts)

    # -- stopping instances ---------------------------------------------------------------

    async def _watch_liveness(self, run: RevisionRun, instance: Instance) -> None:
        settings = run.config.liveness_probe
        assert settings is not None
        check = self._unthrottled(run, instance.info.id, settings)
        failures = await until_unhealthy(instance.info, settings, check)
        if run.instances.get(instance.info.id) is instance and instance.state == "ready":
            what = f"GET {settings.path}" if settings.action == "http" else "TCP connect"
            self._replace(
                run, instance, f"liveness probe ({what}) failed {failures} times in a row"
            )

    def _unthrottled(self, run: RevisionRun, instance_id: str, settings: ProbeSettings) -> Check:
        """The liveness check with full CPU while it runs: a throttled app may answer late."""
        check = check_for(settings)

        async def probe(host: str, port: int) -> bool:
            self.throttler.busy(instance_id)
            try:
                return await check(host, port)
            finally:
                if _in_flight(run.endpoint, instance_id) == 0:
                    self.throttler.idle(instance_id)

        return probe

    def _replace(self, run: RevisionRun, instance: Instance, reason: str) -> None:
        """An unhealthy instance: fail its requests (502) now, stop it, start another."""
        instance_id = instance.info.id
        run.instances.pop(instance_id, None)
        self._let_go(instance)
        run.endpoint.remove_backend(instance_id, reason)
        log.warning("replacing instance %s of %s: %s", instance_id[:12], run.name, reason)
        self._spawn(self._stop(instance_id, run, reason))
        self._start_replacement(run)

    def _start_replacement(self, run: RevisionRun) -> None:
        serving = self._revisions.get(run.name) is run and run.status != "False"
        if serving and self._clock() >= run.next_start:
            self._launch(run)

    def _let_go(self, instance: Instance) -> None:
        """No more throttling or probing of an instance that is leaving."""
        self.throttler.forget(instance.info.id)
        if instance.liveness is not None and instance.liveness is not asyncio.current_task():
            instance.liveness.cancel()

    async def _retire(self, run: RevisionRun, instance: Instance, why: str) -> None:
        """Drain (no new requests, in-flight ones finish), then SIGTERM/SIGKILL."""
        instance.state = "draining"
        self._let_go(instance)
        with contextlib.suppress(KeyError):
            await run.endpoint.drain_backend(instance.info.id)
        run.instances.pop(instance.info.id, None)
        log.info("stopping instance %s of %s: %s", instance.info.id[:12], run.name, why)
        await self._stop(instance.info.id, run, why)

    async def _stop(self, instance_id: str, run: RevisionRun | None = None, why: str = "") -> None:
        if run is not None and self._observer is not None:
            self._observer.instance_stopping(run, instance_id, why)
        try:
            await self._runtime.stop(instance_id, self._grace)
        except RuntimeFailure as error:
            log.warning("stopping %s failed: %s", instance_id[:12], error.message)
        if run is not None and self._observer is not None:
            self._observer.instance_stopped(run, instance_id, why)

    def instance_died(self, instance_id: str, reason: str) -> None:
        """The runtime reports an exit: fail its requests at once; the loop replaces it."""
        for run in self._revisions.values():
            instance = run.instances.get(instance_id)
            if instance is None or instance.state == "draining":
                continue
            if instance.state == "ready":
                run.instances.pop(instance_id)
                self._let_go(instance)
                run.endpoint.remove_backend(instance_id, reason)
                log.warning("instance %s of %s died: %s", instance_id[:12], run.name, reason)
                if self._observer is not None:
                    self._observer.instance_stopped(run, instance_id, reason)
                self._spawn(self._stop(instance_id))
                self._start_replacement(run)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        next_decision = self._clock()
        while True:
            await asyncio.sleep(self._sample_interval)
            now = self._clock()
            for run in list(self._revisions.values()):
                run.scaler.record(now, run.endpoint.take_concurrency_sample())
            if now >= next_decision:
                next_decision = now + self._decide_interval
                for run in list(self._revisions.values()):
                    try:
                        self._reconcile(run, now)
                    except Exception:  # one revision's bug must not stop the others scaling
                        log.exception("reconciling %s failed", run.name)

    def _reconcile(self, run: RevisionRun, now: float) -> None:
        ready = run.ready()
        decision = run.scaler.decide(now, len(ready))
        desired = 0 if run.status == "False" else decision.desired
        current = len(ready) + run.starting
        if desired > current and now >= run.next_start:
            log.info("%s: %d -> %d (%s)", run.name, current, desired, decision.reason)
            if self._observer is not None:
                self._observer.scaled(run, current, desired, decision.reason)
            for _ in range(min(desired - current, self._starts_allowed(len(ready), run))):
                self._launch(run)
        elif desired < len(ready) and run.starting == 0:
            log.info("%s: %d -> %d (%s)", run.name, len(ready), desired, decision.reason)
            if self._observer is not None:
                self._observer.scaled(run, len(ready), desired, decision.reason)
            victims = sorted(ready, key=lambda i: _in_flight(run.endpoint, i.info.id))
            for instance in victims[: len(ready) - desired]:
                self._spawn(self._retire(run, instance, decision.reason))

    async def adopt(self) -> None:
        """After a restart: take over this server's running containers, stop strays."""
        for info in await self._runtime.list_instances():
            run = self._revisions.get(info.revision)
            if run is None or run.status == "False":
                self._spawn(self._stop(info.id))
                continue
            run.instances[info.id] = Instance(info, started_at=self._clock())
            if self._observer is not None:
                self._observer.instance_started(run, info)
            self._spawn(self._adopt_one(run, info))

    async def _adopt_one(self, run: RevisionRun, info: InstanceInfo) -> None:
        try:
            await wait_ready(self._runtime, info, info.port, ADOPT_TIMEOUT)
        except InstanceFailed:
            run.instances.pop(info.id, None)
            await self._stop(info.id, run, "adopted instance did not answer")
            return
        self._became_ready(run, run.instances[info.id])
        if run.status == "Unknown":
            run.status = "True"
            self._report(run.namespace, run.name, "True")

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("reconciler task failed", exc_info=task.exception())

    async def close(self) -> None:
        """Stop background work; instances keep running for adoption by the next start."""
        self.throttler.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for run in self._revisions.values():
            run.endpoint.close("server shutting down")

    async def settle(self) -> None:
        """Wait for background work in flight (tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one), which containers
    started on this machine share with it."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _in_flight(endpoint: RevisionEndpoint, backend_id: str) -> int:
    backend = endpoint.backends.get(backend_id)
    return backend.in_flight if backend else 0
