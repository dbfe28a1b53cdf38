"""Knative status blocks: conditions and the derived status of services (pure)."""

from __future__ import annotations

from typing import Any

from cloudlet.domain.traffic import ResolvedTarget

Condition = dict[str, Any]


def condition(
    kind: str, status: str, reason: str = "", message: str = "", now: str = ""
) -> Condition:
    out: Condition = {"type": kind, "status": status}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    if now:
        out["lastTransitionTime"] = now
    return out


def revision_ready(revision: dict[str, Any]) -> str:
    """'True', 'False' or 'Unknown' from a revision body's Ready condition."""
    for cond in revision.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return str(cond.get("status", "Unknown"))
    return "Unknown"


def ready_condition(revision: dict[str, Any]) -> Condition:
    for cond in revision.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return dict(cond)
    return condition("Ready", "Unknown", "Deploying", "")


def configuration_condition(latest_created: dict[str, Any] | None, now: str) -> Condition:
    if latest_created is None:
        return condition("ConfigurationsReady", "Unknown", "NoRevision", "", now)
    ready = ready_condition(latest_created)
    name = latest_created["metadata"]["name"]
    if ready["status"] == "True":
        return condition("ConfigurationsReady", "True", now=ready.get("lastTransitionTime", now))
    if ready["status"] == "False":
        return condition(
            "ConfigurationsReady",
            "False",
            ready.get("reason", "RevisionFailed"),
            f"Revision {name!r} is not ready: {ready.get('message', '')}".strip(),
            ready.get("lastTransitionTime", now),
        )
    return condition(
        "ConfigurationsReady",
        "Unknown",
        "RevisionMissing",
        f"Revision {name!r} is being deployed.",
        now,
    )


def routes_condition(resolved: list[ResolvedTarget], wanted_latest: bool, now: str) -> Condition:
    if wanted_latest and not any(t.latest for t in resolved):
        return condition(
            "RoutesReady",
            "Unknown",
            "RevisionMissing",
            "waiting for a ready revision to send traffic to",
            now,
        )
    return condition("RoutesReady", "True", now=now)


def ready_from(config: Condition, routes: Condition, now: str) -> Condition:
    for part in (config, routes):
        if part["status"] == "False":
            return condition("Ready", "False", part.get("reason", ""), part.get("message", ""), now)
    for part in (config, routes):
        if part["status"] == "Unknown":
            return condition(
                "Ready", "Unknown", part.get("reason", ""), part.get("message", ""), now
            )
    return condition("Ready", "True", now=now)
