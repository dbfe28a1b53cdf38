"""Flags every `run` command shares with gcloud: --project, --region, --platform, --format."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_REGION = "local"


def common(func: F) -> F:
    """Accept gcloud's global flags so pasted commands work unchanged."""
    decorators = [
        click.option(
            "--project",
            "project",
            default=None,
            envvar="CLOUDLET_PROJECT",
            help="Project; Cloudlet keeps each project in its own namespace (default: 'default').",
        ),
        click.option("--region", default=None, help="Accepted for gcloud compatibility."),
        click.option(
            "--platform",
            type=click.Choice(["managed", "kubernetes", "gke"]),
            default="managed",
            show_default=True,
            help="managed = this Cloudlet server.",
        ),
        click.option(
            "--format",
            "fmt",
            default=None,
            help="Output format: yaml, json or export (default: human-readable).",
        ),
        click.option("--quiet", "-q", is_flag=True, help="Do not prompt for confirmation."),
    ]
    for decorator in reversed(decorators):
        func = decorator(func)
    return func


def namespace(project: str | None) -> str:
    return project or "default"
