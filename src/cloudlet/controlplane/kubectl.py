"""What kubectl needs beyond plain GET/POST/PUT/DELETE: patches and tables (pure).

`kubectl apply` reads the live object and sends the difference as a JSON merge patch
(RFC 7386; Knative's kinds are custom resources, so never a strategic merge patch);
`kubectl apply --server-side` sends the whole applied object as YAML. Cloudlet applies both
onto the live Service and stores the result with an ordinary replace, so the same
validation and revision rules hold. Server-side apply keeps no field managers: applying an
object merges it into the live one, and removing a field needs `kubectl edit` or `replace`.

`kubectl get` asks for a ``Table`` (``Accept: ...;as=Table;g=meta.k8s.io``) and prints its
columns; Cloudlet answers with Knative's printer columns (URL, latest revisions, Ready).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import yaml

from cloudlet.domain.errors import InvalidError

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
SUPPORTED = (MERGE_PATCH, APPLY_PATCH)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: ``patch`` applied to ``target`` (null deletes a key; lists are replaced)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def patch_kind(content_type: str) -> str:
    """The patch media type of a request, or InvalidError naming the supported ones."""
    kind = content_type.split(";")[0].strip().lower()
    if kind not in SUPPORTED:
        raise InvalidError(
            f"Content-Type: {kind or 'none'!r} is not a supported patch type for Knative "
            f"services; use {MERGE_PATCH} (`kubectl patch --type merge`) or {APPLY_PATCH} "
            "(`kubectl apply --server-side`)",
            field="Content-Type",
        )
    return kind


def parse_patch(raw: bytes, kind: str) -> dict[str, Any]:
    """The patch document (JSON for merge patches, YAML for server-side apply)."""
    try:
        text = raw.decode()
        patch = json.loads(text or "null") if kind == MERGE_PATCH else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidError(f"body: not a valid {kind} document ({exc})", field="body") from None
    if not isinstance(patch, dict):
        raise InvalidError(f"body: a {kind} patch must be an object", field="body")
    return patch


def applied_object(patch: dict[str, Any], name: str) -> dict[str, Any]:
    """A server-side-apply body for a new object: its name must be the one in the path."""
    given_meta = patch.get("metadata")
    metadata: dict[str, Any] = given_meta if isinstance(given_meta, dict) else {}
    given = metadata.get("name") or name
    if given != name:
        raise InvalidError(
            f"metadata.name: {given!r} does not match the service {name!r} in the request path",
            field="metadata.name",
        )
    return {**patch, "metadata": {**metadata, "name": name}}


# -- tables: what `kubectl get` prints ------------------------------------------------------

Cell = Callable[[dict[str, Any]], Any]


def _condition(field: str) -> Cell:
    def cell(item: dict[str, Any]) -> str:
        for cond in item.get("status", {}).get("conditions", []):
            if cond.get("type") == "Ready":
                return str(cond.get(field, ""))
        return "Unknown" if field == "status" else ""

    return cell


def _status(field: str) -> Cell:
    return lambda item: str(item.get("status", {}).get(field, ""))


def _name(item: dict[str, Any]) -> str:
    return str(item["metadata"]["name"])


def _label(key: str) -> Cell:
    return lambda item: str((item["metadata"].get("labels") or {}).get(key, ""))


# Knative's own printer columns (its CRDs' additionalPrinterColumns), Name first.
COLUMNS: dict[str, list[tuple[str, Cell]]] = {
    "Service": [
        ("URL", _status("url")),
        ("LatestCreated", _status("latestCreatedRevisionName")),
        ("LatestReady", _status("latestReadyRevisionName")),
        ("Ready", _condition("status")),
        ("Reason", _condition("reason")),
    ],
    "Revision": [
        ("Config Name", _label("serving.knative.dev/configuration")),
        ("Generation", _label("serving.knative.dev/configurationGeneration")),
        ("Ready", _condition("status")),
        ("Reason", _condition("reason")),
    ],
    "Configuration": [
        ("LatestCreated", _status("latestCreatedRevisionName")),
        ("LatestReady", _status("latestReadyRevisionName")),
        ("Ready", _condition("status")),
        ("Reason", _condition("reason")),
    ],
    "Route": [
        ("URL", _status("url")),
        ("Ready", _condition("status")),
        ("Reason", _condition("reason")),
    ],
}


def wants_table(accept: str) -> bool:
    """True when the client (kubectl get) asks for a meta.k8s.io Table."""
    return "as=Table" in accept and "g=meta.k8s.io" in accept


def table(kind: str, items: list[dict[str, Any]], include: str | None) -> dict[str, Any]:
    """``items`` as a meta.k8s.io/v1 Table; ``include`` is the includeObject parameter."""
    columns = [("Name", _name), *COLUMNS.get(kind, [])]
    definitions = [
        {
            "name": name,
            "type": "string",
            "format": "name" if name == "Name" else "",
            "description": "",
            "priority": 0,
        }
        for name, _ in columns
    ]
    rows = [
        {"cells": [cell(item) for _, cell in columns], **_row_object(item, include)}
        for item in items
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": definitions,
        "rows": rows,
    }


def _row_object(item: dict[str, Any], include: str | None) -> dict[str, Any]:
    if include == "None":
        return {}
    if include == "Object":
        return {"object": item}
    partial = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1"}
    return {"object": {**partial, "metadata": item["metadata"]}}
