"""`cloudlet run services logs read|tail` and `cloudlet beta run services logs tail`."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import click
import httpx

from cloudlet.cli import render
from cloudlet.cli.client import ApiError, Client, discover
from cloudlet.cli.options import common, namespace

LOGS = "/apis/cloudlet.dev/v1/namespaces/{namespace}/services/{service}/logs"


def logs_path(project: str | None, service: str) -> str:
    return LOGS.format(namespace=namespace(project), service=service)


def entry_line(entry: dict[str, Any]) -> str:
    """One entry as a line: time, severity, instance and the message (or the request)."""
    when = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00"))
    stamp = when.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    instance = entry.get("labels", {}).get("instanceId", "")[:12]
    http = entry.get("httpRequest")
    if http is not None:
        latency_ms = float(http["latency"].rstrip("s")) * 1000
        text = (
            f"{http['requestMethod']} {http['status']} {http['requestUrl']} "
            f"{latency_ms:.0f} ms {http['responseSize']} B"
        )
    elif "jsonPayload" in entry:
        payload = entry["jsonPayload"]
        text = str(payload.get("message", json.dumps(payload)))
    else:
        text = str(entry.get("textPayload", ""))
    return f"{stamp} {entry['severity']:<8} {instance or '-':<12} {text}"


@click.group("logs")
def logs_group() -> None:
    """Read and follow a service's logs: instance output, requests, platform events."""


@logs_group.command("read")
@click.argument("service")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--freshness", help="Only entries this recent, e.g. 10m, 1h, 2d.")
@click.option("--log-filter", default="", help="e.g. 'severity>=ERROR' or 'textPayload:\"x\"'.")
@common
def logs_read(
    service: str,
    limit: int,
    freshness: str | None,
    log_filter: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Print a service's latest log entries, newest first."""
    params = {"limit": str(limit), "filter": log_filter}
    if freshness:
        params["freshness"] = freshness
    client = Client.from_env()
    entries = client.request("GET", logs_path(project, service), params=params)["entries"]
    if render.emit(entries, fmt):
        return
    for entry in entries:
        render.out.print(entry_line(entry))


@logs_group.command("tail")
@click.argument("service")
@click.option("--log-filter", default="", help="Only entries matching this filter.")
@common
def logs_tail(
    service: str,
    log_filter: str,
    project: str | None,
    region: str | None,
    platform: str,
    fmt: str | None,
    quiet: bool,
) -> None:
    """Follow a service's log entries as they are written (Ctrl-C stops)."""
    base, token = discover()
    url = base + logs_path(project, service) + "/tail"
    headers = {"Authorization": f"Bearer {token}"}
    timeout = httpx.Timeout(10.0, read=None)
    try:
        with httpx.stream(
            "GET", url, params={"filter": log_filter}, headers=headers, timeout=timeout
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response.json().get("message", response.text), response.status_code)
            render.err.print(f"Tailing logs of {service}; Ctrl-C stops.")
            for line in response.iter_lines():
                if line.strip():
                    entry = json.loads(line)
                    print(json.dumps(entry) if fmt == "json" else entry_line(entry), flush=True)
    except httpx.TransportError as exc:
        raise ApiError(f"lost the log stream from {base}: {exc}") from None


@click.group("beta")
def beta_group() -> None:
    """Commands gcloud keeps in beta (`cloudlet beta run services logs tail`)."""


@beta_group.group("run")
def beta_run() -> None:
    """Cloud Run commands in beta."""


@beta_run.group("services")
def beta_services() -> None:
    """Services (beta commands)."""


beta_logs = click.Group("logs", help="A service's logs (beta).")
beta_logs.add_command(logs_tail)
beta_logs.add_command(logs_read)
beta_services.add_command(beta_logs)


def recent_traffic_lines(client: Client, ns: str, service: str) -> list[str]:
    """`services describe`'s lines on the last minutes: requests/s, latency, instances."""
    path = f"/apis/cloudlet.dev/v1/namespaces/{ns}/services/{service}/metrics"
    try:
        m = client.request("GET", path)
    except ApiError:
        return []  # an older server without telemetry: describe the rest anyway

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    minutes = m["window_seconds"] / 60
    return [
        f"Last {minutes:.0f} minutes:",
        f"  Requests:      {m['requests']} ({m['requests_per_second']:.2f}/s)",
        f"  Latency:       p50 {ms(m['latency_p50'])}, p95 {ms(m['latency_p95'])}, "
        f"p99 {ms(m['latency_p99'])}",
        f"  Instances:     {m['instances']} now, {m['cold_starts']} cold starts",
    ]
