"""Kubernetes API discovery, so kubectl finds Knative's resources on the control API.

kubectl asks `/version`, `/api`, `/apis` and `/apis/serving.knative.dev/v1` which kinds a
server has, their plural names and short names (`ksvc`, `rev`), and which verbs they allow,
before it sends any request for them. Cloudlet has no core (`v1`) group: `/api` lists no
versions.

`kubectl apply` also reads the OpenAPI v3 document of the group, for two answers only:
whether a PATCH takes the ``fieldValidation`` parameter (yes: the server refuses unknown
fields itself, so kubectl does not validate against a schema) and whether it takes
strategic merge patches (no: custom resources take JSON merge patches). The document says
exactly that and carries no schemas; OpenAPI v2 is not served.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from cloudlet import __version__
from cloudlet.domain.models import API_VERSION

GROUP, VERSION = API_VERSION.split("/")
# The Kubernetes release whose API conventions Cloudlet follows (kubectl warns about skew).
KUBE_MAJOR, KUBE_MINOR = "1", "32"
CATEGORIES = ["all", "knative", "serving"]


def _resource(plural: str, kind: str, short: list[str], verbs: list[str]) -> dict[str, Any]:
    return {
        "name": plural,
        "singularName": kind.lower(),
        "namespaced": True,
        "kind": kind,
        "verbs": verbs,
        "shortNames": short,
        "categories": CATEGORIES,
    }


RESOURCES = [
    _resource(
        "services",
        "Service",
        ["kservice", "ksvc"],
        ["create", "delete", "get", "list", "patch", "update"],
    ),
    _resource("revisions", "Revision", ["rev"], ["delete", "get", "list"]),
    _resource("configurations", "Configuration", ["config", "cfg"], ["get", "list"]),
    _resource("routes", "Route", ["rt"], ["get", "list"]),
]


def version_info() -> dict[str, str]:
    """What `/version` answers; kubectl (and its version dispatcher) reads major/minor."""
    return {
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": f"v{KUBE_MAJOR}.{KUBE_MINOR}.0+cloudlet-{__version__}",
        "platform": "cloudlet",
    }


def _group_version() -> dict[str, str]:
    return {"groupVersion": API_VERSION, "version": VERSION}


def api_group() -> dict[str, Any]:
    return {
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": GROUP,
        "versions": [_group_version()],
        "preferredVersion": _group_version(),
    }


def add_discovery_routes(app: FastAPI) -> None:
    """Serve the discovery documents (behind the API's bearer token, except `/version`)."""

    @app.get("/version", include_in_schema=False)
    async def version() -> dict[str, str]:
        return version_info()

    @app.get("/api", include_in_schema=False)
    async def core_versions() -> dict[str, Any]:
        return {"kind": "APIVersions", "versions": [], "serverAddressByClientCIDRs": []}

    @app.get("/apis", include_in_schema=False)
    async def groups() -> dict[str, Any]:
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [api_group()]}

    @app.get(f"/apis/{GROUP}", include_in_schema=False)
    async def group() -> dict[str, Any]:
        return api_group()

    @app.get(f"/apis/{API_VERSION}", include_in_schema=False)
    async def resources() -> dict[str, Any]:
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": API_VERSION,
            "resources": RESOURCES,
        }

    add_openapi_routes(app)


OPENAPI_GROUP_PATH = f"/openapi/v3/apis/{API_VERSION}"
PATCH_TYPES = ("application/merge-patch+json", "application/apply-patch+yaml")


def _gvk(kind: str) -> dict[str, str]:
    return {"group": GROUP, "version": VERSION, "kind": kind}


def _operation(kind: str, verb: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{verb}{kind}",
        "x-kubernetes-action": verb,
        "x-kubernetes-group-version-kind": _gvk(kind),
        "responses": {"200": {"description": "OK"}},
    }
    if verb == "patch":
        operation["parameters"] = [
            {"name": name, "in": "query", "schema": {"type": "string"}}
            for name in ("dryRun", "fieldManager", "fieldValidation")
        ]
        operation["requestBody"] = {
            "content": {media: {"schema": {"type": "object"}} for media in PATCH_TYPES}
        }
    return operation


def _paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for resource in RESOURCES:
        base = f"/apis/{API_VERSION}/namespaces/{{namespace}}/{resource['name']}"
        verbs = resource["verbs"]
        kind = resource["kind"]
        action = {"get": "get", "update": "put", "patch": "patch", "delete": "delete"}
        paths[base] = {"get": _operation(kind, "list")}
        paths[base + "/{name}"] = {
            method: _operation(kind, verb) for verb, method in action.items() if verb in verbs
        }
    return paths


def openapi_v3() -> dict[str, Any]:
    """The group's OpenAPI v3 document: operations and their parameters, no schemas."""
    return {
        "openapi": "3.0.0",
        "info": {"title": "Cloudlet (Knative Serving v1)", "version": __version__},
        "paths": _paths(),
        "components": {"schemas": {}},
    }


def add_openapi_routes(app: FastAPI) -> None:
    @app.get("/openapi/v3", include_in_schema=False)
    async def openapi_index() -> dict[str, Any]:
        relative = f"{OPENAPI_GROUP_PATH}?hash={__version__}"
        return {
            "paths": {
                OPENAPI_GROUP_PATH.removeprefix("/openapi/v3/"): {"serverRelativeURL": relative}
            }
        }

    @app.get(OPENAPI_GROUP_PATH, include_in_schema=False)
    async def openapi_group() -> dict[str, Any]:
        return openapi_v3()
