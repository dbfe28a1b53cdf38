"""`cloudlet run services update-traffic`: move traffic and tags between revisions.

As gcloud does, the new ``spec.traffic`` is computed client-side from the service's current
one (``cloudlet.domain.traffic.apply_change``) and written back with its resourceVersion, so
a concurrent change is refused rather than overwritten. The result is shown as gcloud shows
it: one line per revision with its percent, then its tags and their URLs.
"""

from __future__ import annotations

import time
from typing import Any

import click

from cloudlet.cli import render
from cloudlet.cli.client import ApiError, Client
from cloudlet.cli.deploy import WAIT_SECONDS
from cloudlet.cli.failures import DeployFailed
from cloudlet.cli.options import common, namespace
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import TrafficTarget, dump
from cloudlet.domain.names import validate_tag
from cloudlet.domain.traffic import (
    LATEST,
    TrafficChange,
    TrafficRow,
    apply_change,
    traffic_rows,
)


def parse_percentages(values: tuple[str, ...], flag: str) -> dict[str, int]:
    """``KEY=PERCENT,...`` (the flag may repeat; a later KEY wins) as {KEY: PERCENT}."""
    out: dict[str, int] = {}
    for item in (part for value in values for part in value.split(",") if part):
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise InvalidError(f"{flag}: {item!r} is not KEY=PERCENT", field=flag)
        out[key.strip()] = _percent(text, key, flag)
    return out


def _percent(text: str, key: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise InvalidError(
            f"{flag}: traffic percentage value {text!r} for {key} is not an integer", field=flag
        ) from None
    if not 0 <= value <= 100:
        raise InvalidError(
            f"{flag}: traffic percentage value {value} for {key} is not between 0 and 100",
            field=flag,
        )
    return value


def parse_tags(values: tuple[str, ...], flag: str) -> dict[str, str]:
    """``TAG=REVISION,...`` (REVISION may be LATEST) as {TAG: REVISION}."""
    out: dict[str, str] = {}
    for item in (part for value in values for part in value.split(",") if part):
        tag, sep, revision = item.partition("=")
        if not sep or not revision.strip():
            raise InvalidError(
                f"{flag}: {item!r} is not TAG=REVISION (REVISION may be {LATEST})", field=flag
            )
        out[validate_tag(tag.strip(), flag)] = revision.strip()
    return out


def traffic_change(
    to_revisions: tuple[str, ...] = (),
    to_tags: tuple[str, ...] = (),
    to_latest: bool = False,
    set_tags: tuple[str, ...] = (),
    update_tags: tuple[str, ...] = (),
    remove_tags: str | None = None,
    clear_tags: bool = False,
) -> TrafficChange:
    """gcloud's ``_GetTrafficChanges``: the flags of `update-traffic` as one change."""
    _exclusive(
        "--to-revisions, --to-tags or --to-latest",
        bool(to_revisions),
        bool(to_tags),
        to_latest,
    )
    _exclusive(
        "--set-tags, --clear-tags or --update-tags/--remove-tags",
        bool(set_tags),
        clear_tags,
        bool(update_tags or remove_tags),
    )
    if to_latest:
        percentages = {LATEST: 100}
    elif to_tags:
        percentages = parse_percentages(to_tags, "--to-tags")
    else:
        percentages = parse_percentages(to_revisions, "--to-revisions")
    tags = parse_tags(set_tags, "--set-tags") if set_tags else {}
    return TrafficChange(
        percentages=percentages,
        by_tag=bool(to_tags),
        update_tags=tags or parse_tags(update_tags, "--update-tags"),
        remove_tags=frozenset(t for t in (remove_tags or "").split(",") if t),
        clear_other_tags=bool(set_tags) or clear_tags,
    )


def _exclusive(names: str, *given: bool) -> None:
    if sum(given) > 1:
        raise click.UsageError(f"use at most one of {names}")


def update_traffic(
    client: Client, ns: str, name: str, change: TrafficChange, wait: bool = True
) -> dict[str, Any]:
    """Write the service with its traffic changed; wait until its routes follow."""
    service = client.get_service(ns, name)
    if service is None:
        raise ApiError(
            f"service {name!r} not found; `cloudlet run services list` shows what is deployed",
            404,
        )
    current = [TrafficTarget.model_validate(t) for t in service["spec"].get("traffic") or []]
    body = {**service, "spec": {**service["spec"]}}
    targets = apply_change(current, change, name)
    body["spec"]["traffic"] = [dump(t.model_copy(update={"url": None})) for t in targets]
    written: dict[str, Any] = client.request("PUT", client.service_path(ns, name), body)
    if not wait:
        return written
    return wait_routed(client, ns, name, int(written["metadata"]["generation"]))


def wait_routed(
    client: Client, ns: str, name: str, generation: int, timeout: float = WAIT_SECONDS
) -> dict[str, Any]:
    """Poll until RoutesReady is settled, or cannot settle because no revision is ready."""
    deadline = time.monotonic() + timeout
    with render.err.status("Routing traffic..."):
        while True:
            service: dict[str, Any] = client.request("GET", client.service_path(ns, name))
            if _routed(service, generation):
                return service
            if time.monotonic() > deadline:
                raise DeployFailed(f"timed out after {timeout:.0f}s waiting for service {name!r}")
            time.sleep(0.2)


def _routed(service: dict[str, Any], generation: int) -> bool:
    """Routes settled, or waiting on a latest revision that failed and so never will."""
    if int(service.get("status", {}).get("observedGeneration", 0)) < generation:
        return False
    routes = render.condition(service, "RoutesReady")["status"]
    config = render.condition(service, "ConfigurationsReady")["status"]
    return bool(routes != "Unknown" or config == "False")


def rows_of(service: dict[str, Any]) -> list[TrafficRow]:
    status = service.get("status", {})
    return traffic_rows(
        [TrafficTarget.model_validate(t) for t in service["spec"].get("traffic") or []],
        [TrafficTarget.model_validate(t) for t in status.get("traffic") or []],
        status.get("latestReadyRevisionName"),
    )


def traffic_lines(rows: list[TrafficRow]) -> list[str]:
    """gcloud's traffic block: ``  90% REVISION`` with each tag's URL beneath."""
    width = max((len(row.percent_text) for row in rows), default=0)
    lines: list[str] = []
    for row in rows:
        lines.append(f"  {row.percent_text:<{width}} {row.revision_text}")
        lines += [f"  {'':<{width}}   {tag.label}: {tag.url}".rstrip() for tag in row.tags]
    return lines


def row_dict(row: TrafficRow, service_url: str) -> dict[str, Any]:
    """A row as gcloud's ``--format yaml|json`` of update-traffic spells it."""
    return {
        "key": row.key,
        "latestRevision": row.key == LATEST,
        "revisionName": row.revision,
        "specPercent": _text(row.spec_percent),
        "statusPercent": _text(row.status_percent),
        "specTags": ", ".join(t.tag for t in row.tags if t.in_spec) or "-",
        "statusTags": ", ".join(t.tag for t in row.tags if t.in_status) or "-",
        "urls": sorted(t.url for t in row.tags if t.url),
        "tags": [
            {"tag": t.tag, "url": t.url, "inSpec": t.in_spec, "inStatus": t.in_status}
            for t in row.tags
        ],
        "displayPercent": row.percent_text,
        "displayRevisionId": row.revision_text,
        "serviceUrl": service_url,
    }


def _text(percent: int | None) -> str:
    return "-" if percent is None else str(percent)


@click.command("update-traffic")
@click.argument("service")
@click.option(
    "--to-revisions",
    multiple=True,
    metavar="REVISION=PERCENT,...",
    help="Set these revisions' percents (LATEST = the latest ready revision); the other "
    "revisions that serve traffic are rescaled proportionally.",
)
@click.option(
    "--to-tags",
    multiple=True,
    metavar="TAG=PERCENT,...",
    help="Set the percents of the revisions carrying these tags; the others are rescaled.",
)
@click.option("--to-latest", is_flag=True, help="Send all traffic to the latest ready revision.")
@click.option(
    "--set-tags", multiple=True, metavar="TAG=REVISION,...", help="Replace all tags with these."
)
@click.option(
    "--update-tags", multiple=True, metavar="TAG=REVISION,...", help="Add or move these tags."
)
@click.option("--remove-tags", metavar="TAG,...", help="Remove these tags.")
@click.option("--clear-tags", is_flag=True, help="Remove all tags.")
@click.option("--async", "run_async", is_flag=True, help="Return without waiting.")
@common
def update_traffic_command(
    service: str,
    to_revisions: tuple[str, ...],
    to_tags: tuple[str, ...],
    to_latest: bool,
    set_tags: tuple[str, ...],
    update_tags: tuple[str, ...],
    remove_tags: str | None,
    clear_tags: bool,
    run_async: bool,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Adjust the traffic split and the tags of SERVICE (tags change first, then percents)."""
    change = traffic_change(
        to_revisions, to_tags, to_latest, set_tags, update_tags, remove_tags, clear_tags
    )
    if change.empty:
        raise click.UsageError("no traffic configuration change requested")
    client = Client.from_env()
    render.err.print("Updating traffic...")
    result = update_traffic(client, namespace(project), service, change, wait=not run_async)
    if run_async:
        render.err.print("Updating traffic asynchronously.")
        return
    routes = render.condition(result, "RoutesReady")
    if routes["status"] == "True":
        render.err.print("Done.")
    _show(result, fmt)
    if routes["status"] != "True":
        raise DeployFailed(f"Updating traffic failed: {routes.get('message', '')}")


def _dicts(service: dict[str, Any]) -> list[dict[str, Any]]:
    url = service.get("status", {}).get("url", "")
    return [row_dict(row, url) for row in rows_of(service)]


def _show(service: dict[str, Any], fmt: str | None) -> None:
    if render.emit(_dicts(service), fmt):
        return
    render.out.print(f"URL: {service.get('status', {}).get('url', '')}")
    render.out.print("Traffic:")
    for line in traffic_lines(rows_of(service)):
        render.out.print(line)
