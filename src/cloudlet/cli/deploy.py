"""`run deploy` and `run services update`: change the template, write, wait for readiness."""

from __future__ import annotations

import time
from typing import Any

from cloudlet.cli import render
from cloudlet.cli.client import ApiError, Client
from cloudlet.cli.template import TemplateFlags, apply, new_service

WAIT_SECONDS = 300.0


class DeployFailed(Exception):
    """The new revision did not become ready; the message says why."""


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
    _set_traffic(body, existing, no_traffic, tag)
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
    body: dict[str, Any], existing: dict[str, Any] | None, no_traffic: bool, tag: str | None
) -> None:
    traffic: list[dict[str, Any]] = list(body["spec"].get("traffic") or [])
    if no_traffic:
        if existing is None:
            raise ApiError("--no-traffic: cannot be used when creating a new service", 400)
        traffic = [_pinned(t) for t in existing.get("status", {}).get("traffic", [])]
    traffic = [t for t in traffic if not tag or t.get("tag") != tag]
    traffic = [{k: v for k, v in t.items() if k != "url"} for t in traffic]
    if tag:
        traffic.append({"tag": tag, "latestRevision": True, "percent": 0})
    if traffic:
        if not any(t.get("percent") for t in traffic):
            traffic.append({"latestRevision": True, "percent": 100})
        body["spec"]["traffic"] = traffic


def _pinned(target: dict[str, Any]) -> dict[str, Any]:
    """A status traffic entry turned into a spec target that stays on its revision."""
    out = {"revisionName": target["revisionName"], "percent": target.get("percent", 0)}
    if target.get("tag"):
        out["tag"] = target["tag"]
    return out


def set_public(client: Client, namespace: str, region: str, name: str, public: bool) -> None:
    """Add or remove the allUsers binding of roles/run.invoker."""
    policy = client.request("POST", client.iam(namespace, region, name, "getIamPolicy"), {})
    bindings = [b for b in policy.get("bindings", []) if b["role"] != "roles/run.invoker"]
    members: list[str] = next(
        (b["members"] for b in policy.get("bindings", []) if b["role"] == "roles/run.invoker"), []
    )
    members = [m for m in members if m != "allUsers"] + (["allUsers"] if public else [])
    if members:
        bindings.append({"role": "roles/run.invoker", "members": members})
    client.request(
        "POST",
        client.iam(namespace, region, name, "setIamPolicy"),
        {"policy": {"bindings": bindings, "etag": policy.get("etag")}},
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
