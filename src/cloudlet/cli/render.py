"""Output: tables, YAML/JSON, progress, errors (rich on stderr for progress)."""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=True, markup=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def emit(data: Any, fmt: str | None) -> bool:
    """Print ``data`` as YAML or JSON when a format asks for it; False for table output."""
    if fmt in ("yaml", "export"):
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, default_flow_style=False))
        return True
    if fmt == "json":
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return True
    return False


def table(columns: list[str], rows: list[list[str]]) -> None:
    grid = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*row)
    out.print(grid)


def ready_mark(resource: dict[str, Any]) -> str:
    for cond in resource.get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return {"True": "✔", "False": "✘"}.get(cond.get("status"), "…")
    return "…"


def condition(resource: dict[str, Any], kind: str = "Ready") -> dict[str, Any]:
    for cond in resource.get("status", {}).get("conditions", []):
        if cond.get("type") == kind:
            return dict(cond)
    return {"type": kind, "status": "Unknown"}
