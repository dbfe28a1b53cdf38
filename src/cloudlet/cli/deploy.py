"""`run deploy` and `run services update`: change the template, write, wait for readiness."""

from __future__ import annotations

import re
import time
from typing import Any

from cloudlet.cli import render
from cloudlet.cli.client import Client
from cloudlet.cli.failures import DeployFailed
from cloudlet.cli.template import TemplateFlags, apply, new_service
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import TrafficTarget, dump
from cloudlet.domain.names import random_token, revision_name, validate_tag
from cloudlet.domain.traffic import update_tags, zero_latest

WAIT_SECONDS = 300.0


def deploy(
    client: Client,
    namespace: str,
    region: str,
    name: str,
    flags: TemplateFlags,
    *,
    allow_unauthenticated: bool | None,
    no_traffic: bool = False,
    tag: str | None = None,
    wait: bool = True,
) -> dict[str, Any]:
    """Create or update the service, set its invoker policy, wait until its revision is ready."""
    existing = client.get_service(namespace, name)
    body = apply(existing or new_service(name, namespace), flags)
    _set_traffic(client, namespace, body, existing, no_traffic, tag)
    verb = "Deploying" if existing else "Deploying new service"
    render.err.print(
        f"{verb} [bold]{name}[/] in project [bold]{namespace}[/] region [bold]{region}[/]"
    )
    if existing:
        written = client.request("PUT", client.service_path(namespace, name), body)
    else:
        written = client.request("POST", client.service_path(namespace), body)
    if allow_unauthenticated is not None:
        set_public(client, namespace, region, name, allow_unauthenticated)
    if not wait:
        return dict(written)
    return wait_ready(client, namespace, name, int(written["metadata"]["generation"]))


def _set_traffic(
    client: Client,
    namespace: str,
    body: dict[str, Any],
    existing: dict[str, Any] | None,
    no_traffic: bool,
    tag: str | None,
) -> None:
    """gcloud's NoTrafficChange then TagOnDeployChange: keep the latest revision's traffic
    on the revision that is latest now, and tag the revision being created by its name."""
    if not (no_traffic or tag):
        return
    if no_traffic and existing is None:
        raise InvalidError(
            "--no-traffic: not supported when creating a new service; deploy it first",
            field="--no-traffic",
        )
    targets = [TrafficTarget.model_validate(t) for t in body["spec"].get("traffic") or []]
    if existing is not None and no_traffic:
        ready = existing.get("status", {}).get("latestReadyRevisionName")
        targets = zero_latest(targets, ready)
    if tag:
        revision = _revision_to_create(client, namespace, body)
        targets = update_tags(targets, {validate_tag(tag, "--tag"): revision})
    body["spec"]["traffic"] = [dump(t.model_copy(update={"url": None})) for t in targets]


def _revision_to_create(client: Client, namespace: str, body: dict[str, Any]) -> str:
    """Name the new revision client-side (as gcloud does for --tag) so the tag can point at it."""
    meta = body["spec"]["template"].setdefault("metadata", {})
    if not meta.get("name"):
        service = body["metadata"]["name"]
        names = [r["metadata"]["name"] for r in client.revisions(namespace, service)]
        number = next_revision_number(service, names)
        meta["name"] = revision_name(service, number, None, random_token())
    return str(meta["name"])


def next_revision_number(service: str, names: list[str]) -> int:
    """One past the highest NNNNN of ``SERVICE-NNNNN-xyz`` names (and past their count)."""
    pattern = re.compile(rf"^{re.escape(service)}-(\d{{5}})-[a-z0-9]+$")
    numbers = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return 1 + max([len(names), *numbers])


def set_public(client: Client, namespace: str, region: str, name: str, public: bool) -> None:
    """Add or remove the allUsers binding of roles/run.invoker."""
    edit_binding(client, namespace, region, name, "allUsers", "roles/run.invoker", public)


def edit_binding(
    client: Client, namespace: str, region: str, name: str, member: str, role: str, add: bool
) -> None:
    """Read the service's IAM policy, add or remove one member of one role, write it back."""
    policy = client.request("POST", client.iam(namespace, region, name, "getIamPolicy"), {})
    bindings = {b["role"]: set(b["members"]) for b in policy.get("bindings", [])}
    members = bindings.setdefault(role, set())
    if add:
        members.add(member)
    else:
        members.discard(member)
    new = [{"role": r, "members": sorted(m)} for r, m in bindings.items() if m]
    client.request(
        "POST",
        client.iam(namespace, region, name, "setIamPolicy"),
        {"policy": {"bindings": new, "etag": policy.get("etag")}},
    )


def wait_ready(
    client: Client, namespace: str, name: str, generation: int, timeout: float = WAIT_SECONDS
) -> dict[str, Any]:
    """Poll until the latest revision is Ready (or failed), showing progress."""
    deadline = time.monotonic() + timeout
    with render.err.status("Creating revision and waiting for it to become ready...") as spinner:
        while True:
            service = client.request("GET", client.service_path(namespace, name))
            state = _progress(service, generation)
            if state is not None:
                break
            spinner.update(_step(service))
            if time.monotonic() > deadline:
                raise DeployFailed(f"timed out after {timeout:.0f}s waiting for service {name!r}")
            time.sleep(0.2)
    if state is False:
        cond = render.condition(service, "ConfigurationsReady")
        revision = service.get("status", {}).get("latestCreatedRevisionName", "?")
        raise DeployFailed(
            f"Revision {revision!r} is not ready and cannot serve traffic. "
            f"{cond.get('message', '')}"
        )
    return dict(service)


def _progress(service: dict[str, Any], generation: int) -> bool | None:
    status = service.get("status", {})
    if int(status.get("observedGeneration", 0)) < generation:
        return None
    config = render.condition(service, "ConfigurationsReady")["status"]
    ready = render.condition(service)["status"]
    if config == "False":
        return False
    return True if ready == "True" else None


def _step(service: dict[str, Any]) -> str:
    cond = render.condition(service, "ConfigurationsReady")
    revision = service.get("status", {}).get("latestCreatedRevisionName", "")
    if cond["status"] != "True":
        return f"Creating revision {revision}: starting its first instance..."
    return "Routing traffic..."


def summary(service: dict[str, Any]) -> str:
    status = service.get("status", {})
    revision = status.get("latestReadyRevisionName", "")
    percent = sum(
        t.get("percent", 0) for t in status.get("traffic", []) if t.get("revisionName") == revision
    )
    lines = [
        f"Service [{service['metadata']['name']}] revision [{revision}] has been deployed "
        f"and is serving {percent} percent of traffic."
    ]
    lines += [
        f"The revision can be reached directly at {t['url']}"
        for t in status.get("traffic", [])
        if t.get("tag") and t.get("revisionName") == revision
    ]
    lines.append(f"Service URL: {status.get('url', '')}")
    return "\n".join(lines)
