"""Use-cases on services and revisions: create, replace, delete, status, IAM.

Every template change makes a new immutable revision; a traffic-only change makes none.
Status is derived on read from the stored spec and the revisions' own conditions, so it
never drifts from what the reconciler reported.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cloudlet.controlplane import status as st
from cloudlet.domain.autoscale import policy_from_annotations
from cloudlet.domain.errors import AlreadyExistsError, ConflictError, InvalidError, NotFoundError
from cloudlet.domain.models import (
    API_VERSION,
    RevisionTemplate,
    Service,
    TrafficTarget,
    dump,
    parse_service,
)
from cloudlet.domain.names import random_token, revision_name, validate_service_name
from cloudlet.domain.revision import revision_config, template_key, with_defaults
from cloudlet.domain.traffic import ResolvedTarget, default_traffic, resolve, why_in_use
from cloudlet.domain.traffic import validate as validate_traffic
from cloudlet.security.access import access_for
from cloudlet.security.secrets import secret_refs
from cloudlet.store import Record, Store

SERVICE, REVISION, POLICY = "services", "revisions", "iampolicies"
SERVICE_LABEL = "serving.knative.dev/service"
INVOKER = "roles/run.invoker"
Listener = Callable[[str, str], None]


def timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Urls:
    """How service URLs are spelled: http://[TAG---]SERVICE.DOMAIN[:PORT]."""

    domain: str
    port: int

    def service(self, name: str, tag: str | None = None) -> str:
        host = f"{tag}---{name}.{self.domain}" if tag else f"{name}.{self.domain}"
        return f"http://{host}" if self.port == 80 else f"http://{host}:{self.port}"


class ServiceManager:
    """Services and their revisions, stored as Knative JSON."""

    def __init__(self, store: Store, urls: Urls, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._urls = urls
        self._clock = clock
        self._listeners: list[Listener] = []
        self.check_secret: Callable[[str, str, str], None] | None = None
        """``(namespace, secret, version)``: NotFoundError unless that version exists; new
        revisions are checked with it (the server installs the secret vault's)."""

    def subscribe(self, listener: Listener) -> None:
        """``listener(namespace, service)`` after any change to that service or its revisions."""
        self._listeners.append(listener)

    def _changed(self, namespace: str, name: str) -> None:
        for listener in self._listeners:
            listener(namespace, name)

    # -- services -------------------------------------------------------------------------

    def list_services(self, namespace: str | None) -> list[dict[str, Any]]:
        return [self._render(r) for r in self._store.list(SERVICE, namespace)]

    def get_service(self, namespace: str, name: str) -> dict[str, Any]:
        return self._render(self._service_record(namespace, name))

    def create_service(self, namespace: str, body: Any, dry_run: bool = False) -> dict[str, Any]:
        service = _parse(body)
        name = validate_service_name(service.metadata.name)
        if self._store.get(SERVICE, namespace, name):
            raise AlreadyExistsError(
                f"metadata.name: service {name!r} already exists in namespace {namespace!r}; "
                "use `cloudlet run deploy` or `services replace` to change it",
                field="metadata.name",
            )
        self._refuse_name_elsewhere(namespace, name)
        return self._apply(namespace, service, None, dry_run)

    def replace_service(
        self, namespace: str, name: str, body: Any, dry_run: bool = False
    ) -> dict[str, Any]:
        service = _parse(body)
        if service.metadata.name and service.metadata.name != name:
            raise InvalidError(
                f"metadata.name: {service.metadata.name!r} does not match the service {name!r} "
                "in the request path",
                field="metadata.name",
            )
        service.metadata.name = validate_service_name(name)
        return self._apply(namespace, service, self._service_record(namespace, name), dry_run)

    def delete_service(self, namespace: str, name: str) -> dict[str, Any]:
        record = self._service_record(namespace, name)
        with self._store.transaction():
            self._store.delete_owned(REVISION, namespace, name)
            self._store.delete(POLICY, namespace, name)
            self._store.delete(SERVICE, namespace, name)
        self._changed(namespace, name)
        return record.body

    def _service_record(self, namespace: str, name: str) -> Record:
        record = self._store.get(SERVICE, namespace, name)
        if record is None:
            raise NotFoundError(
                f"service {name!r} not found in namespace {namespace!r}; "
                "`cloudlet run services list` shows what is deployed",
                field="metadata.name",
            )
        return record

    def _refuse_name_elsewhere(self, namespace: str, name: str) -> None:
        for record in self._store.list(SERVICE):
            if record.name == name and record.namespace != namespace:
                raise AlreadyExistsError(
                    f"metadata.name: a service named {name!r} already exists in namespace "
                    f"{record.namespace!r}; service URLs are per machine, so choose another name",
                    field="metadata.name",
                )

    def _apply(
        self, namespace: str, service: Service, existing: Record | None, dry_run: bool
    ) -> dict[str, Any]:
        if (
            existing
            and service.metadata.resourceVersion
            and service.metadata.resourceVersion != str(existing.version)
        ):
            raise ConflictError(
                f"metadata.resourceVersion: service {service.metadata.name!r} changed since "
                f"version {service.metadata.resourceVersion}; read it again and retry",
                field="metadata.resourceVersion",
            )
        template = with_defaults(service.spec.template)
        config = revision_config(template)  # validates quantities, env, min/max scale
        access_for((), (), service.metadata.annotations or {})  # validates ingress, audiences
        policy_from_annotations(dict(config.annotations), config.container_concurrency)
        revisions = self._store.list(REVISION, namespace, owner=service.metadata.name)
        new_revision = self._new_revision_name(service.metadata.name, template, revisions, existing)
        known = {r.name for r in revisions} | ({new_revision} if new_revision else set())
        traffic = service.spec.traffic or default_traffic()
        validate_traffic(traffic, known)
        body = self._service_body(namespace, service, template, traffic, existing, new_revision)
        if new_revision and self.check_secret is not None:
            self._check_secrets(namespace, dump(template.spec))
        if dry_run:
            return body
        if existing is not None and new_revision is None and body == existing.body:
            return self._render(existing)  # nothing changed: no write, no new resourceVersion
        self._write(namespace, body, template, new_revision, existing)
        self._changed(namespace, service.metadata.name)
        return self.get_service(namespace, service.metadata.name)

    def _check_secrets(self, namespace: str, spec: dict[str, Any]) -> None:
        """Every secret version a new revision names exists (as Cloud Run checks at deploy);
        InvalidError naming the field otherwise, and nothing is stored."""
        assert self.check_secret is not None
        refs: list[tuple[str, str, str]] = []
        base = "spec.template.spec"
        for i, var in enumerate((spec.get("containers") or [{}])[0].get("env") or []):
            field = f"{base}.containers[0].env[{i}].valueFrom.secretKeyRef"
            refs += [(field, name, version) for _, name, version in secret_refs([var])]
        for i, volume in enumerate(spec.get("volumes") or []):
            source = volume.get("secret")
            if source:
                for item in source.get("items") or [{"key": "latest"}]:
                    refs.append((f"{base}.volumes[{i}].secret", source["secretName"], item["key"]))
        for field, name, version in refs:
            try:
                self.check_secret(namespace, name, version)
            except NotFoundError as error:
                raise InvalidError(
                    f"{field}: {error.message}; create it with `cloudlet secrets create {name} "
                    "--data-file FILE` (or add the version) first",
                    field=field,
                ) from None

    def _new_revision_name(
        self,
        service: str,
        template: RevisionTemplate,
        revisions: list[Record],
        existing: Record | None,
    ) -> str | None:
        """The name of the revision this template needs, or None if the latest matches."""
        wanted = template.metadata.name
        key = template_key(template)
        by_name = {r.name: r for r in revisions}
        if wanted:
            if not wanted.startswith(f"{service}-"):
                raise InvalidError(
                    f"spec.template.metadata.name: revision name {wanted!r} must start with "
                    f"{service + '-'!r}",
                    field="spec.template.metadata.name",
                )
            if wanted in by_name:
                if by_name[wanted].body["metadata"]["annotations"].get(_KEY_NOTE) != _key_text(key):
                    raise ConflictError(
                        f"spec.template.metadata.name: revision {wanted!r} already exists with a "
                        "different template; revisions are immutable, choose another "
                        "--revision-suffix",
                        field="spec.template.metadata.name",
                    )
                return None
            return wanted
        latest = (
            existing.body.get("status", {}).get("latestCreatedRevisionName") if existing else None
        )
        if latest in by_name and by_name[latest].body["metadata"]["annotations"].get(
            _KEY_NOTE
        ) == _key_text(key):
            return None
        return revision_name(service, _next_number(revisions), None, random_token())

    def _service_body(
        self,
        namespace: str,
        service: Service,
        template: RevisionTemplate,
        traffic: list[TrafficTarget],
        existing: Record | None,
        new_revision: str | None,
    ) -> dict[str, Any]:
        old = existing.body if existing else {}
        spec = {"template": dump(template), "traffic": [dump(t) for t in traffic]}
        old_meta = old.get("metadata", {})
        generation = int(old_meta.get("generation", 0))
        if spec != old.get("spec"):
            generation += 1
        latest = new_revision or old.get("status", {}).get("latestCreatedRevisionName")
        return {
            "apiVersion": API_VERSION,
            "kind": "Service",
            "metadata": {
                "name": service.metadata.name,
                "namespace": namespace,
                "uid": old_meta.get("uid") or str(uuid.uuid4()),
                "generation": generation,
                "creationTimestamp": old_meta.get("creationTimestamp") or timestamp(self._clock()),
                "labels": service.metadata.labels or {},
                "annotations": service.metadata.annotations or {},
            },
            "spec": spec,
            "status": {"latestCreatedRevisionName": latest, "observedGeneration": generation},
        }

    def _write(
        self,
        namespace: str,
        body: dict[str, Any],
        template: RevisionTemplate,
        new_revision: str | None,
        existing: Record | None,
    ) -> None:
        name = body["metadata"]["name"]
        with self._store.transaction():
            if new_revision:
                number = _next_number(self._store.list(REVISION, namespace, owner=name))
                revision = self._revision_body(namespace, body, template, new_revision, number)
                self._store.put(
                    REVISION, namespace, new_revision, revision, owner=name, now=self._clock()
                )
            self._store.put(
                SERVICE,
                namespace,
                name,
                body,
                expect_version=existing.version if existing else None,
                now=self._clock(),
            )

    def _revision_body(
        self,
        namespace: str,
        service: dict[str, Any],
        template: RevisionTemplate,
        name: str,
        number: int,
    ) -> dict[str, Any]:
        meta = service["metadata"]
        now = timestamp(self._clock())
        labels = dict(template.metadata.labels or {})
        labels.update(
            {
                SERVICE_LABEL: meta["name"],
                "serving.knative.dev/configuration": meta["name"],
                "serving.knative.dev/configurationGeneration": str(meta["generation"]),
                "serving.knative.dev/serviceUid": meta["uid"],
            }
        )
        annotations = dict(template.metadata.annotations or {})
        annotations[_KEY_NOTE] = _key_text(template_key(template))
        return {
            "apiVersion": API_VERSION,
            "kind": "Revision",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "creationTimestamp": now,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Configuration",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "revisionNumber": number,
            },
            "spec": dump(template.spec),
            "status": {
                "observedGeneration": 1,
                "conditions": [
                    st.condition(
                        "Ready", "Unknown", "Deploying", "Starting the first instance.", now
                    ),
                ],
            },
        }

    # -- status -----------------------------------------------------------------------------

    def _render(self, record: Record) -> dict[str, Any]:
        body = {
            **record.body,
            "metadata": {**record.body["metadata"], "resourceVersion": str(record.version)},
        }
        body["status"] = self._status(record)
        return body

    def _latest(self, record: Record) -> tuple[Record | None, Record | None]:
        revisions = self._store.list(REVISION, record.namespace, owner=record.name)
        latest_name = record.body.get("status", {}).get("latestCreatedRevisionName")
        created = next((r for r in revisions if r.name == latest_name), None)
        ready = [r for r in revisions if st.revision_ready(r.body) == "True"]
        ready.sort(key=_generation)
        return created, (ready[-1] if ready else None)

    def resolved_traffic(self, record: Record) -> list[ResolvedTarget]:
        _, ready = self._latest(record)
        targets = [TrafficTarget.model_validate(t) for t in record.body["spec"]["traffic"]]
        return resolve(targets, ready.name if ready else None)

    def _status(self, record: Record) -> dict[str, Any]:
        created, ready = self._latest(record)
        now = _last_change(record, created, ready)
        targets = [TrafficTarget.model_validate(t) for t in record.body["spec"]["traffic"]]
        resolved = resolve(targets, ready.name if ready else None)
        config = st.configuration_condition(created.body if created else None, now)
        routes = st.routes_condition(resolved, any(t.latestRevision for t in targets), now)
        url = self._urls.service(record.name)
        out: dict[str, Any] = {
            "observedGeneration": record.body["metadata"]["generation"],
            "conditions": [st.ready_from(config, routes, now), config, routes],
            "latestCreatedRevisionName": created.name if created else None,
            "latestReadyRevisionName": ready.name if ready else None,
            "url": url,
            "address": {"url": url},
            "traffic": [self._traffic_status(record.name, t) for t in resolved],
        }
        return {k: v for k, v in out.items() if v is not None}

    def _traffic_status(self, service: str, target: ResolvedTarget) -> dict[str, Any]:
        out: dict[str, Any] = {"revisionName": target.revision, "percent": target.percent}
        if target.latest:
            out["latestRevision"] = True
        if target.tag:
            out["tag"] = target.tag
            out["url"] = self._urls.service(service, target.tag)
        return out

    # -- revisions -------------------------------------------------------------------------

    def list_revisions(
        self, namespace: str | None, service: str | None = None
    ) -> list[dict[str, Any]]:
        records = self._store.list(REVISION, namespace, owner=service)
        routed = self._routed(records)
        return [
            _revision_view(r, (r.namespace, r.name) in routed)
            for r in sorted(records, key=_generation, reverse=True)
        ]

    def get_revision(self, namespace: str, name: str) -> dict[str, Any]:
        record = self._revision_record(namespace, name)
        return _revision_view(record, (namespace, name) in self._routed([record]))

    def _routed(self, revisions: list[Record]) -> set[tuple[str, str]]:
        """(namespace, name) of those revisions that get traffic or a tag."""
        routed: set[tuple[str, str]] = set()
        for namespace, owner in {(r.namespace, r.owner) for r in revisions}:
            service = self._store.get(SERVICE, namespace, owner)
            if service is not None:
                routed |= {(namespace, t.revision) for t in self.resolved_traffic(service)}
        return routed

    def _revision_record(self, namespace: str, name: str) -> Record:
        record = self._store.get(REVISION, namespace, name)
        if record is None:
            raise NotFoundError(
                f"revision {name!r} not found in namespace {namespace!r}; "
                "`cloudlet run revisions list` shows the revisions",
                field="metadata.name",
            )
        return record

    def delete_revision(self, namespace: str, name: str) -> dict[str, Any]:
        record = self._revision_record(namespace, name)
        service = self._service_record(namespace, record.owner)
        in_use = why_in_use(self.resolved_traffic(service), name)
        if in_use:
            raise ConflictError(
                f"revision {name!r} {in_use} for service {record.owner!r}; move them away "
                "first with `cloudlet run services update-traffic` (--to-revisions, "
                "--remove-tags)",
                field="metadata.name",
            )
        if name == service.body.get("status", {}).get("latestCreatedRevisionName"):
            raise ConflictError(
                f"revision {name!r} is the latest revision of service {record.owner!r} and "
                "cannot be deleted; deploy a new revision first",
                field="metadata.name",
            )
        self._store.delete(REVISION, namespace, name)
        self._changed(namespace, record.owner)
        return _revision_view(record)

    def set_revision_status(
        self,
        namespace: str,
        name: str,
        ready: str,
        reason: str = "",
        message: str = "",
        image_digest: str | None = None,
    ) -> None:
        """Record the reconciler's verdict on a revision (Ready True/False/Unknown)."""
        record = self._store.get(REVISION, namespace, name)
        if record is None:
            return
        body = dict(record.body)
        status = dict(body.get("status", {}))
        before = st.ready_condition(body)
        verdict = st.condition("Ready", ready, reason, message)
        unchanged = all(before.get(k) == verdict.get(k) for k in ("status", "reason", "message"))
        if unchanged and "lastTransitionTime" in before:
            if not image_digest or status.get("imageDigest") == image_digest:
                return  # the same verdict again: no write, no change for watchers
            verdict["lastTransitionTime"] = before["lastTransitionTime"]
        else:
            verdict["lastTransitionTime"] = timestamp(self._clock())
        status["conditions"] = [verdict]
        if image_digest:
            status["imageDigest"] = image_digest
        body["status"] = status
        self._store.put(REVISION, namespace, name, body, owner=record.owner, now=self._clock())
        self._changed(namespace, record.owner)

    def revision_record(self, namespace: str, name: str) -> Record | None:
        return self._store.get(REVISION, namespace, name)

    def service_record(self, namespace: str, name: str) -> Record | None:
        return self._store.get(SERVICE, namespace, name)

    # -- IAM ---------------------------------------------------------------------------------

    def get_policy(self, namespace: str, name: str) -> dict[str, Any]:
        self._service_record(namespace, name)
        record = self._store.get(POLICY, namespace, name)
        policy = dict(record.body) if record else {"version": 1, "bindings": []}
        # gcloud decodes the etag as bytes, so it must be base64
        version = str(record.version if record else 0).encode()
        policy["etag"] = base64.b64encode(b"v" + version).decode()
        return policy

    def set_policy(self, namespace: str, name: str, policy: Any) -> dict[str, Any]:
        self._service_record(namespace, name)
        clean = validate_policy(policy)
        self._store.put(POLICY, namespace, name, clean, owner=name, now=self._clock())
        self._changed(namespace, name)
        return self.get_policy(namespace, name)

    def is_public(self, namespace: str, name: str) -> bool:
        return "allUsers" in self.invokers(namespace, name)

    def invokers(self, namespace: str, name: str) -> set[str]:
        """Members holding roles/run.invoker on the service."""
        record = self._store.get(POLICY, namespace, name)
        bindings = record.body.get("bindings", []) if record else []
        return {m for b in bindings if b.get("role") == INVOKER for m in b.get("members", [])}

    @property
    def urls(self) -> Urls:
        return self._urls


_KEY_NOTE = "cloudlet.dev/template-hash"
_MEMBER_PREFIXES = ("user:", "serviceAccount:", "group:", "domain:")


def _key_text(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _next_number(revisions: list[Record]) -> int:
    return 1 + max((_generation(r) for r in revisions), default=0)


def _last_change(*records: Record | None) -> str:
    """When the inputs of a service's derived status last changed: the newest creation or
    Ready transition among the service and its latest revisions. Reading the status twice
    gives the same lastTransitionTime (watchers see no change that did not happen)."""
    times = []
    for record in records:
        if record is None:
            continue
        times.append(str(record.body["metadata"].get("creationTimestamp") or ""))
        for cond in record.body.get("status", {}).get("conditions", []):
            if cond.get("type") == "Ready":
                times.append(str(cond.get("lastTransitionTime") or ""))
    return max(times)


def _generation(record: Record) -> int:
    return int(record.body["metadata"].get("revisionNumber", 0))


def _revision_view(record: Record, routed: bool | None = None) -> dict[str, Any]:
    body = {
        **record.body,
        "metadata": {**record.body["metadata"], "resourceVersion": str(record.version)},
    }
    meta = body["metadata"]
    meta["annotations"] = {k: v for k, v in meta.get("annotations", {}).items() if k != _KEY_NOTE}
    meta.pop("revisionNumber", None)
    if routed is not None:  # Knative's Active condition; gcloud's ACTIVE column reads it
        active = st.condition("Active", "True") if routed else _NO_TRAFFIC
        status = body.get("status", {})
        body["status"] = {**status, "conditions": [*status.get("conditions", []), active]}
    return body


_NO_TRAFFIC = st.condition("Active", "False", "NoTraffic", "The target is not receiving traffic.")


def _parse(body: Any) -> Service:
    return parse_service(body)


def validate_policy(policy: Any) -> dict[str, Any]:
    """An IAM policy with well-formed bindings: {role, members[]}."""
    if not isinstance(policy, dict) or not isinstance(policy.get("bindings", []), list):
        raise InvalidError(
            "policy.bindings: expected a list of {role, members}", field="policy.bindings"
        )
    bindings = []
    for i, binding in enumerate(policy.get("bindings", [])):
        where = f"policy.bindings[{i}]"
        if not isinstance(binding, dict) or not str(binding.get("role", "")).startswith("roles/"):
            raise InvalidError(
                f"{where}.role: expected a role such as {INVOKER}", field=f"{where}.role"
            )
        members = binding.get("members", [])
        for j, member in enumerate(members if isinstance(members, list) else [None]):
            if not isinstance(member, str) or not (
                member in ("allUsers", "allAuthenticatedUsers")
                or member.startswith(_MEMBER_PREFIXES)
            ):
                raise InvalidError(
                    f"{where}.members[{j}]: {member!r} is not a member; use allUsers or "
                    "user:NAME, serviceAccount:NAME, group:NAME",
                    field=f"{where}.members[{j}]",
                )
        bindings.append({"role": binding["role"], "members": sorted(set(members))})
    return {"version": 1, "bindings": [b for b in bindings if b["members"]]}
