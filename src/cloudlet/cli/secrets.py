"""`cloudlet secrets ...`: secrets and their versions, as in `gcloud secrets`.

Payloads go in (``--data-file FILE``, ``-`` for stdin) and never come back out: there is
no `versions access`. Instances read them through `run deploy --set-secrets`.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import click

from cloudlet.cli import render
from cloudlet.cli.client import Client
from cloudlet.cli.options import common, namespace


@click.group("secrets")
def secrets_group() -> None:
    """Create secrets and add versions; deploy with --set-secrets ENV=SECRET:VERSION."""


def _read(data_file: str) -> str:
    raw = sys.stdin.buffer.read() if data_file == "-" else Path(data_file).read_bytes()
    return base64.b64encode(raw).decode()


def _path(project: str | None, name: str = "") -> str:
    base = f"/v1/projects/{namespace(project)}/secrets"
    return f"{base}/{name}" if name else base


DATA_FILE = click.option(
    "--data-file",
    required=True,
    type=click.Path(allow_dash=True, dir_okay=False),
    help="File holding the value; - reads stdin.",
)


@secrets_group.command("create")
@click.argument("name")
@DATA_FILE
@common
def secrets_create(name: str, data_file: str, project: str | None, **_: Any) -> None:
    """Create secret NAME with its first version."""
    client = Client.from_env()
    payload = _read(data_file)
    client.request("POST", _path(project), {}, params={"secretId": name})
    client.request("POST", _path(project, name) + ":addVersion", {"payload": {"data": payload}})
    render.err.print(f"Created version [1] of the secret [{name}].", markup=False)


@secrets_group.command("list")
@common
def secrets_list(project: str | None, fmt: str | None, **_: Any) -> None:
    """List secrets (names and version counts, never values)."""
    secrets = Client.from_env().request("GET", _path(project))["secrets"]
    if not render.emit(secrets, fmt):
        rows = [
            [s["name"].rsplit("/", 1)[-1], s["createTime"], str(s["versionCount"])] for s in secrets
        ]
        render.table(["NAME", "CREATED", "VERSIONS"], rows)


@secrets_group.command("delete")
@click.argument("name")
@common
def secrets_delete(name: str, project: str | None, quiet: bool, **_: Any) -> None:
    """Delete secret NAME and all its versions."""
    if not quiet:
        click.confirm(
            f"Secret [{name}] and all its versions will be deleted. Continue?", abort=True
        )
    Client.from_env().request("DELETE", _path(project, name))
    render.err.print(f"Deleted secret [{name}].", markup=False)


@secrets_group.group("versions")
def versions_group() -> None:
    """Add and list versions of a secret."""


@versions_group.command("add")
@click.argument("name")
@DATA_FILE
@common
def versions_add(name: str, data_file: str, project: str | None, **_: Any) -> None:
    """Add a version to secret NAME; `latest` then means it."""
    body = {"payload": {"data": _read(data_file)}}
    version = Client.from_env().request("POST", _path(project, name) + ":addVersion", body)
    number = version["name"].rsplit("/", 1)[-1]
    render.err.print(f"Created version [{number}] of the secret [{name}].", markup=False)


@versions_group.command("list")
@click.argument("name")
@common
def versions_list(name: str, project: str | None, fmt: str | None, **_: Any) -> None:
    """List the versions of secret NAME."""
    versions = Client.from_env().request("GET", _path(project, name) + "/versions")["versions"]
    if not render.emit(versions, fmt):
        rows = [[v["name"].rsplit("/", 1)[-1], v["state"], v["createTime"]] for v in versions]
        render.table(["NAME", "STATE", "CREATED"], rows)
