"""`cloudlet billing report`: usage and cost per service and revision, the free tier, and
the hourly ceiling each revision's --max-instances implies."""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from cloudlet.cli import render
from cloudlet.cli.client import Client
from cloudlet.cli.options import namespace
from cloudlet.telemetry.billing import Prices, Usage, load_prices, report, reprice

REPORT = "/apis/cloudlet.dev/v1/namespaces/{namespace}/billing/report"
COLUMNS = [
    "service",
    "revision",
    "mode",
    "billable_seconds",
    "vcpu_seconds",
    "gib_seconds",
    "requests",
    "cost",
    "max_instances",
    "ceiling_per_hour",
]


@click.group("billing")
def billing_group() -> None:
    """What your services cost, priced like Cloud Run."""


@billing_group.command("report")
@click.option("--service", help="Only this service.")
@click.option("--since", help="Start date (YYYY-MM-DD or ISO time, UTC); default: this month.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
)
@click.option(
    "--price-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML or JSON prices overriding Cloud Run tier 1 (see docs/telemetry.md).",
)
@click.option("--project", envvar="CLOUDLET_PROJECT", help="Project (namespace).")
def billing_report(
    service: str | None,
    since: str | None,
    fmt: str,
    price_file: Path | None,
    project: str | None,
) -> None:
    """Usage (vCPU-s, GiB-s, requests) and cost per service and revision."""
    params = {k: v for k, v in {"service": service, "since": since}.items() if v}
    body: dict[str, Any] = Client.from_env().request(
        "GET", REPORT.format(namespace=namespace(project)), params=params
    )
    if price_file is not None:
        body = _repriced(body, load_prices(price_file))
    if fmt == "json":
        sys.stdout.write(json.dumps(body, indent=2) + "\n")
    elif fmt == "csv":
        _csv(body)
    else:
        _table(body)


def _repriced(body: dict[str, Any], prices: Prices) -> dict[str, Any]:
    rows = reprice([Usage(**row) for row in body["rows"]], prices)
    return {**body, "prices": asdict(prices), **report(rows, prices).as_dict()}


def _csv(body: dict[str, Any]) -> None:
    writer = csv.writer(sys.stdout)
    writer.writerow(COLUMNS)
    for row in [*body["rows"], body["total"]]:
        writer.writerow(["" if row[c] is None else row[c] for c in COLUMNS])


def _money(value: float | None) -> str:
    return "unbounded" if value is None else f"${value:.6f}"


def _table(body: dict[str, Any]) -> None:
    render.out.print(f"Usage from {body['since']} to {body['until']}")
    render.out.print("MAX = --max-instances; MAX $/H = the hourly cost ceiling it implies.")
    rows = [
        [
            row["service"],
            row["revision"],
            row["mode"],
            f"{row['vcpu_seconds']:.1f}",
            f"{row['gib_seconds']:.1f}",
            str(row["requests"]),
            _money(row["cost"]),
            str(row["max_instances"] or "-"),
            _money(row["ceiling_per_hour"]),
        ]
        for row in [*body["rows"], body["total"]]
    ]
    rows[-1][:3] = ["TOTAL", "", ""]
    render.table(
        ["SERVICE", "REVISION", "BILLING", "VCPU-S", "GIB-S", "REQS", "COST", "MAX", "MAX $/H"],
        rows,
    )
    free = body["free_tier"]
    render.out.print(
        f"Monthly free tier: {free['vcpu_seconds']:,.0f} vCPU-s, {free['gib_seconds']:,.0f} "
        f"GiB-s, {free['requests']:,.0f} requests. "
        f"Cost after the free tier: {_money(body['cost_after_free_tier'])}"
    )
