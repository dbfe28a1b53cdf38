"""Keeps the data plane and the reconciler in step with the stored services.

On every change to a service or its revisions it rebuilds that service's route (traffic
targets, tags, invoker policy) and tells the reconciler which revisions exist.
"""

from __future__ import annotations

import logging

from cloudlet.autoscaler.reconciler import Reconciler
from cloudlet.controlplane import status as st
from cloudlet.controlplane.services import REVISION, ServiceManager
from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.routing import RoutingTable, ServiceRoute
from cloudlet.domain.models import RevisionTemplate
from cloudlet.domain.revision import revision_config
from cloudlet.security.access import AccessGate, access_for
from cloudlet.store import Record, Store

log = logging.getLogger("cloudlet.controller")


class Controller:
    """The glue between stored intent (services) and what runs (routes, instances)."""

    def __init__(
        self,
        store: Store,
        services: ServiceManager,
        reconciler: Reconciler,
        table: RoutingTable,
        gate: AccessGate | None = None,
    ) -> None:
        self._gate = gate
        self._store = store
        self._services = services
        self._reconciler = reconciler
        self._table = table

    def sync_all(self) -> None:
        for record in self._store.list("services"):
            self.changed(record.namespace, record.name)

    def changed(self, namespace: str, name: str) -> None:
        service = self._services.service_record(namespace, name)
        revisions = self._store.list(REVISION, namespace, owner=name) if service else []
        endpoints = {r.name: self._upsert(namespace, name, r) for r in revisions}
        for run in self._reconciler.revisions():
            if run.namespace == namespace and run.service == name and run.name not in endpoints:
                self._reconciler.remove(run.name)
        if service is None:
            self._table.remove_service(name)
            if self._gate is not None:
                self._gate.remove(name)
            return
        self._route(namespace, service, endpoints)

    def _upsert(self, namespace: str, service: str, record: Record) -> RevisionEndpoint:
        meta = record.body["metadata"]
        template = RevisionTemplate.model_validate(
            {
                "metadata": {"labels": meta.get("labels"), "annotations": meta.get("annotations")},
                "spec": record.body["spec"],
            }
        )
        return self._reconciler.upsert(
            namespace,
            service,
            record.name,
            revision_config(template),
            st.revision_ready(record.body),
            image_id=record.body.get("status", {}).get("imageDigest"),
        )

    def _route(
        self, namespace: str, service: Record, endpoints: dict[str, RevisionEndpoint]
    ) -> None:
        resolved = self._services.resolved_traffic(service)
        targets = tuple(
            (endpoints[t.revision], t.percent)
            for t in resolved
            if t.percent > 0 and t.revision in endpoints
        )
        tags = {t.tag: endpoints[t.revision] for t in resolved if t.tag and t.revision in endpoints}
        if not targets:
            self._table.remove_service(service.name)
            return
        if sum(percent for _, percent in targets) != 100:
            # Part of the split names a revision that is not ready yet: as Knative does,
            # keep serving the previous route until every target can take its share.
            log.warning("route of %s not updated: its targets are not all ready", service.name)
            return
        public = self._services.is_public(namespace, service.name)
        if self._gate is not None:
            public = self._guard(namespace, service, tags) and public
        self._table.set_service(ServiceRoute(service.name, targets, tags, public))

    def _guard(self, namespace: str, service: Record, tags: dict[str, RevisionEndpoint]) -> bool:
        """Give the gate the service's invokers, audiences and ingress; False if internal."""
        assert self._gate is not None
        urls = self._services.urls
        access = access_for(
            self._services.invokers(namespace, service.name),
            [urls.service(service.name), *(urls.service(service.name, t) for t in tags)],
            service.body["metadata"].get("annotations") or {},
        )
        self._gate.set(service.name, access)
        return not access.internal
