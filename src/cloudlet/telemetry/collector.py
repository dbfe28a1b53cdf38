"""The telemetry hub: the reconciler's instance observer, per-instance log pumps, the
router's request records, the billing meters, and the batch writer that stores them.

The router's hooks only append to memory (``request_done``) or flip a meter's state
(``backend_busy``/``backend_idle``); a background task turns the buffer into log entries,
metrics and stored usage every ``flush_interval`` seconds, or sooner when it fills. A full
buffer drops records and counts them; it never blocks the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.routing import RequestRecord
from cloudlet.runtimes.base import InstanceInfo, Runtime, RuntimeFailure
from cloudlet.telemetry.billing import GIB, InstanceMeter, RevisionShape, Span
from cloudlet.telemetry.logs import (
    SYSTEM,
    Followers,
    LogEntry,
    LogStore,
    RequestRow,
    parse_line,
    request_json,
)
from cloudlet.telemetry.metrics import Family, Metrics

if TYPE_CHECKING:
    from cloudlet.autoscaler.reconciler import RevisionRun

log = logging.getLogger("cloudlet.telemetry")
Clock = Callable[[], float]
WRITE_CHUNK = 1000


def request_row(end: float, r: RequestRecord, namespace: str) -> RequestRow:
    """The stored form of a finished request (see ``logs.RequestRow``)."""
    return (
        end - r.latency,
        namespace,
        r.service or "",
        r.revision or "",
        r.backend or "",
        r.method,
        r.url,
        r.status,
        r.latency,
        r.request_bytes,
        r.response_bytes,
        r.remote_ip,
        r.user_agent,
        r.trace_id,
    )


def shape_of(run: RevisionRun) -> RevisionShape:
    c = run.config
    return RevisionShape(
        run.service,
        run.name,
        c.cpu_millis / 1000,
        c.memory_bytes / GIB,
        "request" if c.cpu_throttling else "instance",
        c.max_scale,
    )


class Telemetry:
    """Collects logs, request records, platform events and billing spans; see module doc."""

    def __init__(
        self,
        store: LogStore,
        runtime: Runtime | None = None,
        *,
        wall: Clock = time.time,
        flush_interval: float = 0.5,
        flush_size: int = 5000,
        buffer_limit: int = 100_000,
        install_hooks: Callable[[RevisionEndpoint], None] | None = None,
    ) -> None:
        self.store = store
        self.runtime = runtime
        self.metrics = Metrics()
        self.followers = Followers()
        self._wall = wall
        self._interval = flush_interval
        self._flush_size = flush_size
        self._limit = buffer_limit
        self.install_hooks = install_hooks
        self._requests: deque[tuple[float, RequestRecord]] = deque()
        self._entries: list[LogEntry] = []
        self._spans: list[tuple[str, Span]] = []
        self._runs: dict[str, RevisionRun] = {}
        self.live_runs: Callable[[], list[RevisionRun]] = lambda: list(self._runs.values())
        """The revisions running now (the server points this at the reconciler's)."""
        self._meters: dict[str, tuple[str, InstanceMeter]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self.dropped = 0

    # -- the router's hooks (hot path: O(1), no I/O) ------------------------------------------

    def request_done(self, record: RequestRecord) -> None:
        requests = self._requests
        if len(requests) >= self._limit:
            self.dropped += 1
            return
        requests.append((self._wall(), record))
        if len(requests) == self._flush_size:
            self._wake.set()

    def backend_busy(self, backend_id: str) -> None:
        pair = self._meters.get(backend_id)
        if pair is not None:
            pair[1].set_busy(self._wall(), True)

    def backend_idle(self, backend_id: str) -> None:
        pair = self._meters.get(backend_id)
        if pair is not None:
            pair[1].set_busy(self._wall(), False)

    # -- the reconciler's observer ------------------------------------------------------------

    def revision_added(self, run: RevisionRun) -> None:
        self._runs[run.name] = run
        if self.install_hooks is not None:
            self.install_hooks(run.endpoint)

    def revision_ready(self, run: RevisionRun) -> None:
        self.event(run, "", "revision.ready", f"Revision {run.name} is ready to serve.")

    def instance_started(self, run: RevisionRun, info: InstanceInfo) -> None:
        shape = shape_of(run)
        meter = InstanceMeter(
            run.service, run.name, info.id, shape.cpu, shape.memory_gib, shape.mode
        )
        meter.started(self._wall())
        self._meters[info.id] = (run.namespace, meter)
        self._start_pump(run, info.id)
        self.event(run, info.id, "instance.started", f"Starting new instance {info.id[:12]}.")

    def instance_ready(self, run: RevisionRun, info: InstanceInfo, startup: float) -> None:
        now = self._wall()
        pair = self._meters.get(info.id)
        if pair is not None:
            pair[1].ready(now)
        self.metrics.observe_start(run.service, run.name, startup, now)
        self.event(
            run,
            info.id,
            "instance.ready",
            f"Instance {info.id[:12]} is ready; cold start took {startup * 1000:.0f} ms.",
            startupSeconds=round(startup, 6),
        )

    def instance_stopping(self, run: RevisionRun, instance_id: str, reason: str) -> None:
        pair = self._meters.get(instance_id)
        if pair is not None:
            pair[1].stopping_now(self._wall())
        self.event(
            run,
            instance_id,
            "instance.stopping",
            f"Shutting down instance {instance_id[:12]}: {reason}.",
            reason=reason,
        )

    def instance_stopped(self, run: RevisionRun, instance_id: str, reason: str) -> None:
        pair = self._meters.pop(instance_id, None)
        if pair is not None:
            pair[1].stopped(self._wall())
            self._take_spans(*pair)
        failed = any(word in reason for word in ("exited", "out of memory", "failed"))
        self.event(
            run,
            instance_id,
            "instance.stopped",
            f"Instance {instance_id[:12]} stopped: {reason}.",
            severity="ERROR" if failed else "INFO",
            reason=reason,
        )

    def scaled(self, run: RevisionRun, current: int, desired: int, reason: str) -> None:
        self.event(
            run,
            "",
            "revision.scaled",
            f"Scaling {run.name} from {current} to {desired} instances: {reason}.",
            reason=reason,
            current=current,
            desired=desired,
        )

    def event(
        self,
        run: RevisionRun,
        instance: str,
        kind: str,
        message: str,
        severity: str = "INFO",
        **details: Any,
    ) -> None:
        """A platform event in the revision's log (Cloud Run's varlog/system)."""
        self._entries.append(
            LogEntry(
                self._wall(),
                run.service,
                run.name,
                run.namespace,
                instance,
                severity,
                SYSTEM,
                json_payload={"message": message, "event": kind, **details},
            )
        )

    # -- log pumps ----------------------------------------------------------------------------

    def _start_pump(self, run: RevisionRun, instance_id: str) -> None:
        if self.runtime is None or instance_id in self._pumps:
            return
        task = asyncio.get_running_loop().create_task(self._pump(run, instance_id))
        self._pumps[instance_id] = task
        task.add_done_callback(lambda _: self._pumps.pop(instance_id, None))

    async def _pump(self, run: RevisionRun, instance_id: str) -> None:
        """Copy one instance's stdout/stderr into the log until its container is gone."""
        assert self.runtime is not None
        try:
            async with contextlib.aclosing(self.runtime.stream_logs(instance_id)) as lines:
                async for line in lines:
                    ts = line.timestamp.timestamp()
                    self._entries.append(
                        parse_line(
                            line.line,
                            line.stream,
                            ts,
                            run.service,
                            run.name,
                            run.namespace,
                            instance_id,
                        )
                    )
        except RuntimeFailure as error:
            log.info("log stream of %s ended: %s", instance_id[:12], error.message)

    # -- the batch writer ---------------------------------------------------------------------

    async def run(self) -> None:
        """Flush every ``flush_interval`` seconds (sooner when the buffer fills)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bad batch must not stop logging for good
                log.exception("flushing telemetry failed")

    async def flush(self) -> None:
        """Store what the buffers hold, feed metrics and followers."""
        batch = list(self._requests)
        self._requests.clear()
        entries, self._entries = self._entries, []
        for namespace, meter in self._meters.values():
            if meter.closed:
                self._take_spans(namespace, meter)
        spans, self._spans = self._spans, []
        if self.dropped:
            self.metrics.dropped.inc((), self.dropped)
            self.dropped = 0
        self.metrics.observe_requests(batch)
        rows = [e.to_json() for e in entries]
        requests, counts = self._request_rows(batch)
        if rows or requests:
            await self._write(rows, requests)
            self._publish(rows, requests)
        if spans or counts:
            self.store.write_usage(_span_rows(spans), counts)

    async def _write(self, rows: list[dict[str, Any]], requests: list[RequestRow]) -> None:
        """Store in chunks on the loop's own thread, yielding between them: a writer thread
        would fight the router for the GIL (the convoy effect costs far more than the
        writes), and small chunks keep each pause of the loop to a millisecond or two."""
        for i in range(0, max(len(rows), len(requests)), WRITE_CHUNK):
            self.store.write(rows[i : i + WRITE_CHUNK], requests[i : i + WRITE_CHUNK])
            await asyncio.sleep(0)

    def _publish(self, rows: list[dict[str, Any]], requests: list[RequestRow]) -> None:
        wanted = self.followers.wanted()
        if wanted:
            followed = [request_json(r) for r in requests if (r[1], r[2]) in wanted]
            self.followers.publish(sorted(rows + followed, key=lambda e: str(e["timestamp"])))

    def _namespace(self, revision: str | None) -> str:
        run = self._runs.get(revision or "")
        return run.namespace if run is not None else "default"

    def _request_rows(
        self, batch: list[tuple[float, RequestRecord]]
    ) -> tuple[list[RequestRow], dict[tuple[str, str, str, int], int]]:
        """Stored rows of a batch's requests and their counts per revision and hour."""
        rows: list[RequestRow] = []
        counts: dict[tuple[str, str, str, int], int] = {}
        namespaces: dict[str, str] = {}
        for end, r in batch:
            service, revision = r.service, r.revision
            if not service or not revision:
                continue  # unknown host: no service to log it under
            ns = namespaces.get(revision)
            if ns is None:
                ns = namespaces[revision] = self._namespace(revision)
            rows.append(request_row(end, r, ns))
            key = (ns, service, revision, int(end // 3600))
            counts[key] = counts.get(key, 0) + 1
        return rows, counts

    def _take_spans(self, namespace: str, meter: InstanceMeter) -> None:
        for span in meter.take_closed():
            self._spans.append((namespace, span))
            labels = (("service", span.service), ("revision", span.revision))
            self.metrics.billable.inc(labels, span.billable)

    # -- reading ------------------------------------------------------------------------------

    def open_spans(self, namespace: str) -> list[Span]:
        """Spans not yet stored: closed ones in the buffer and running ones cut at now."""
        now = self._wall()
        spans = [s for ns, s in self._spans if ns == namespace]
        for ns, meter in self._meters.values():
            if ns == namespace:
                spans += meter.closed
                current = meter.open_span(now)
                if current is not None:
                    spans.append(current)
        return spans

    def now(self) -> float:
        return self._wall()

    def shapes(self, namespace: str) -> dict[str, RevisionShape]:
        """What each live revision of the namespace costs per second (for ceilings)."""
        return {run.name: shape_of(run) for run in self.live_runs() if run.namespace == namespace}

    def live_families(self) -> list[Family]:
        """Gauges read at scrape time from the reconciler's revisions and their endpoints."""
        instances = Family("cloudlet_instances", "gauge", "Instances by state.")
        in_flight = Family("cloudlet_requests_in_flight", "gauge", "Requests being served.")
        queued = Family("cloudlet_queue_depth", "gauge", "Requests waiting for an instance.")
        for run in self.live_runs():
            labels = (("service", run.service), ("revision", run.name))
            counts = dict.fromkeys(("starting", "ready", "throttled", "draining"), 0)
            for instance in run.instances.values():
                counts[self._state(run, instance.info.id, instance.state)] += 1
            for state, n in counts.items():
                instances.values[(*labels, ("state", state))] = n
            in_flight.values[labels] = run.endpoint.in_flight
            queued.values[labels] = run.endpoint.queued
        return [instances, in_flight, queued]

    @staticmethod
    def _state(run: RevisionRun, instance_id: str, state: str) -> str:
        backend = run.endpoint.backends.get(instance_id)
        idle = backend is None or backend.in_flight == 0
        if state == "ready" and idle and run.config.cpu_throttling:
            return "throttled"
        return state

    def render_metrics(self) -> str:
        return self.metrics.render(self.live_families())

    def instance_count(self, namespace: str, service: str) -> int:
        return sum(
            len(r.instances)
            for r in self.live_runs()
            if r.namespace == namespace and r.service == service
        )

    async def close(self) -> None:
        """Stop the pumps, cut running meters at now and store everything buffered."""
        for task in list(self._pumps.values()):
            task.cancel()
        await asyncio.gather(*self._pumps.values(), return_exceptions=True)
        now = self._wall()
        for namespace, meter in self._meters.values():
            meter.stopped(now)
            self._take_spans(namespace, meter)
        self._meters.clear()
        await self.flush()


def _span_rows(spans: list[tuple[str, Span]]) -> list[tuple[Any, ...]]:
    return [
        (ns, s.service, s.revision, s.instance, s.start, s.end, s.cpu, s.memory_gib, s.mode)
        for ns, s in spans
    ]
