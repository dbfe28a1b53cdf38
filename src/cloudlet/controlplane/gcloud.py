"""What the real gcloud needs beyond Knative's REST shape (Cloud Run Admin API v1 details).

- Errors: gcloud reads Google's ``{"error": {code, message, status, details}}`` block and
  prints its message; kubectl reads the Kubernetes ``Status`` fields. ``google_error`` makes
  the block the API adds to every Status body, so both print Cloudlet's message.
- Bodies: gcloud sends ``nodeSelector: {}`` in every revision template (it is where GPUs
  would go); ``normalize_service`` drops empty client placeholders before validation.
- Regions: gcloud puts the region in the host name (``REGION-HOST``); a service created
  through such a host is labelled ``cloud.googleapis.com/location`` as Cloud Run does, so
  `gcloud run services list` shows it.
- The global endpoint: `gcloud run regions list` and `gcloud run services list` without
  `--region` call ``/v1/projects/P/locations[/-/services]``.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import FastAPI, Request

from cloudlet.controlplane.services import ServiceManager
from cloudlet.domain.errors import CloudletError, InvalidError
from cloudlet.domain.models import API_VERSION

LOCATION_LABEL = "cloud.googleapis.com/location"
PROJECTS = "/v1/projects/{project}/locations"
# Cloud Run's regions: Cloudlet answers for any of them (the region is only a host prefix).
REGIONS = (
    "asia-east1",
    "asia-northeast1",
    "asia-south1",
    "asia-southeast1",
    "australia-southeast1",
    "europe-north1",
    "europe-west1",
    "europe-west2",
    "europe-west3",
    "europe-west4",
    "me-west1",
    "northamerica-northeast1",
    "southamerica-east1",
    "us-central1",
    "us-east1",
    "us-east4",
    "us-west1",
    "us-west2",
)
_REGIONAL_HOST = re.compile(r"^([a-z]+-[a-z]+\d+)-[^.]")
_CANONICAL = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    503: "UNAVAILABLE",
}


def google_error(error: CloudletError) -> dict[str, Any]:
    """Google's error block for ``error``, with a BadRequest field violation if it names one."""
    status = _CANONICAL.get(error.status, "INTERNAL")
    if error.reason == "AlreadyExists":
        status = "ALREADY_EXISTS"
    details: list[dict[str, Any]] = []
    if error.field:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": error.field, "description": field_message(error)}],
            }
        )
    return {"code": error.status, "message": error.message, "status": status, "details": details}


def field_message(error: CloudletError) -> str:
    """The message without its leading "FIELD: ": gcloud and kubectl print the field first."""
    return error.message.removeprefix(f"{error.field}: ")


def normalize_service(body: Any) -> Any:
    """``body`` without the empty placeholders gcloud always sends (``nodeSelector: {}``)."""
    try:
        spec = body["spec"]["template"]["spec"]
    except (KeyError, TypeError):
        return body
    if isinstance(spec, dict) and spec.get("nodeSelector") in ({}, None):
        spec.pop("nodeSelector", None)
    return body


def region_of(request: Request) -> str | None:
    """The Cloud Run region gcloud put in front of the host name, if any."""
    match = _REGIONAL_HOST.match(request.headers.get("host", ""))
    return match.group(1) if match else None


def stamp_region(body: Any, request: Request) -> Any:
    """Label a new service with the region it was created through, as Cloud Run does."""
    region = region_of(request)
    metadata = body.get("metadata") if isinstance(body, dict) else None
    if region and isinstance(metadata, dict):
        labels = metadata.get("labels") or {}
        if isinstance(labels, dict):
            metadata["labels"] = {LOCATION_LABEL: region, **labels}
    return body


def _location(project: str, region: str) -> dict[str, Any]:
    return {
        "name": f"projects/{project}/locations/{region}",
        "locationId": region,
        "displayName": region,
        "labels": {LOCATION_LABEL: region},
    }


def add_gcloud_routes(app: FastAPI, services: ServiceManager) -> None:
    """The global-endpoint calls gcloud makes (regions list, services list of all regions)."""

    @app.get(PROJECTS, include_in_schema=False)
    async def locations(project: str) -> dict[str, Any]:
        return {"locations": [_location(project, region) for region in REGIONS]}

    @app.post(PROJECTS + "/{location}/services/{service}:testIamPermissions")
    async def test_permissions(request: Request) -> dict[str, Any]:
        # The API token is the only identity and may do everything; gcloud asks before it
        # offers to make a new service public.
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            raise InvalidError("body: not valid JSON", field="body") from None
        permissions = body.get("permissions", []) if isinstance(body, dict) else []
        return {"permissions": [p for p in permissions if isinstance(p, str)]}

    @app.get(PROJECTS + "/{location}/services", include_in_schema=False)
    async def all_services(project: str, location: str) -> dict[str, Any]:
        items = services.list_services(project)
        if location != "-":
            items = [s for s in items if _in_region(s, location)]
        return {"apiVersion": API_VERSION, "kind": "ServiceList", "metadata": {}, "items": items}


def _in_region(service: dict[str, Any], region: str) -> bool:
    labels = service["metadata"].get("labels") or {}
    return bool(labels.get(LOCATION_LABEL, region) == region)
