"""The telemetry hub: the reconciler's instance observer, per-instance log pumps, the
router's request records, the billing meters, and the batch writer that stores them.

The router's hooks only append to memory (``request_done``) or flip a meter's state
(``backend_busy``/``backend_idle``); every ``flush_interval`` seconds a background task
feeds the metrics and hands the batch to the sink, in the server the log writer process
(``writer.LogWriter``), which decodes and stores it off the router's loop. Records past
the buffer limit at a flush are dropped and counted; the router never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.routing import RequestRecord
from cloudlet.runtimes.base import InstanceInfo, Runtime, RuntimeFailure
from cloudlet.telemetry.billing import GIB, InstanceMeter, RevisionShape, Span
from cloudlet.telemetry.logs import (
    SYSTEM,
    Batch,
    Followers,
    LogEntry,
    LogStore,
    columns_of,
    pack_requests,
    parse_line,
    request_json,
    request_row,
)
from cloudlet.telemetry.metrics import Family, Metrics
from cloudlet.telemetry.writer import InlineSink, Sink

if TYPE_CHECKING:
    from cloudlet.autoscaler.reconciler import RevisionRun

log = logging.getLogger("cloudlet.telemetry")
Clock = Callable[[], float]
BATCH_RECORDS = 2000
"""Request records per batch handed to the sink (each is pickled on the loop)."""


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
        buffer_limit: int = 100_000,
        install_hooks: Callable[[RevisionEndpoint], None] | None = None,
        sink: Sink | None = None,
    ) -> None:
        self.store = store
        self.sink: Sink = sink if sink is not None else InlineSink(store)
        self.runtime = runtime
        self.metrics = Metrics()
        self.followers = Followers()
        self._wall = wall
        self._interval = flush_interval
        self._limit = buffer_limit
        self.install_hooks = install_hooks
        self._requests: list[RequestRecord] = []
        self.request_done: Callable[[RequestRecord], None] = self._requests.append
        """The router's hook for each finished request: a bare list append (no Python
        frame on the hot path); ``flush`` empties the list in place and enforces the
        buffer limit."""
        self._entries: list[LogEntry] = []
        self._spans: list[tuple[str, Span]] = []
        self._runs: dict[str, RevisionRun] = {}
        self.live_runs: Callable[[], list[RevisionRun]] = lambda: list(self._runs.values())
        """The revisions running now (the server points this at the reconciler's)."""
        self._meters: dict[str, tuple[str, InstanceMeter]] = {}
        self._pumps: dict[str, asyncio.Task[None]] = {}
        self.dropped = 0

    # -- the router's hooks (hot path: O(1), no I/O) ------------------------------------------

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
        """Flush every ``flush_interval`` seconds."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except Exception:  # a bad batch must not stop logging for good
                log.exception("flushing telemetry failed")

    async def flush(self) -> None:
        """Feed metrics and followers from the buffers and hand them to the sink."""
        records = self._requests[:]
        self._requests.clear()
        if len(records) > self._limit:
            self.dropped += len(records) - self._limit
            del records[self._limit :]
        entries, self._entries = self._entries, []
        for namespace, meter in self._meters.values():
            if meter.closed:
                self._take_spans(namespace, meter)
        spans, self._spans = self._spans, []
        rows = [e.to_json() for e in entries]
        runs = self._runs
        for i in range(0, max(len(records), 1), BATCH_RECORDS):
            if i:
                await asyncio.sleep(0)  # each batch is pickled on the loop: let the router in
            chunk = records[i : i + BATCH_RECORDS]
            columns = columns_of(chunk)
            self.metrics.observe_requests(columns)
            revisions = set(columns.revision)
            namespaces = {r: runs[r].namespace for r in revisions if r is not None and r in runs}
            body = pack_requests(columns, namespaces) if chunk else None
            if i == 0 and (rows or spans or body):
                self._submit(Batch(rows, body, _span_rows(spans)), len(chunk))
            elif body is not None:
                self._submit(Batch([], body, []), len(chunk))
        self._publish(rows, records)
        if self.dropped:
            self.metrics.dropped.inc((), self.dropped)
            self.dropped = 0

    async def sync(self, timeout: float = 10.0) -> None:
        """Flush, then wait until everything flushed is stored (reads see it after), or
        ``timeout`` seconds at most: a read must not hang on a writer that keeps failing."""
        await self.flush()
        try:
            await asyncio.wait_for(self.sink.sync(), timeout)
        except TimeoutError:
            log.warning("the log writer is %.0f s behind; reading what is stored", timeout)

    def _submit(self, batch: Batch, records: int) -> None:
        if not self.sink.submit(batch):
            self.dropped += records
            log.warning("the log writer is behind: dropped %d request records", records)

    def _publish(self, rows: list[dict[str, Any]], records: list[RequestRecord]) -> None:
        wanted = self.followers.wanted()
        if not wanted:
            return
        followed = []
        for r in records:
            run = self._runs.get(r.revision or "")
            namespace = run.namespace if run is not None else "default"
            if r.service and r.revision and (namespace, r.service) in wanted:
                followed.append(request_json(request_row(r, namespace)))
        self.followers.publish(sorted(rows + followed, key=lambda e: str(e["timestamp"])))

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
            # starts launched but whose container the engine has not created yet count too
            counts["starting"] = max(counts["starting"], run.starting)
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
        await self.sink.close()


def _span_rows(spans: list[tuple[str, Span]]) -> list[tuple[Any, ...]]:
    return [
        (ns, s.service, s.revision, s.instance, s.start, s.end, s.cpu, s.memory_gib, s.mode)
        for ns, s in spans
    ]
