"""The control API: Knative Serving v1 REST (Cloud Run Admin API v1) over HTTP.

The one place errors become HTTP: every CloudletError turns into a Kubernetes ``Status``
body with the code, reason and the field it names (plus Google's ``error`` block, which is
what gcloud prints). All routes but ``/healthz`` and ``/version`` need the bearer token the
server created in CLOUDLET_HOME. The real gcloud and kubectl use these routes too; what
only they need lives in ``gcloud``, ``discovery`` and ``kubectl`` (docs/gcloud-kubectl.md).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloudlet.controlplane import kubectl
from cloudlet.controlplane.builds import BuildService, add_build_routes
from cloudlet.controlplane.discovery import add_discovery_routes
from cloudlet.controlplane.gcloud import (
    add_gcloud_routes,
    field_message,
    google_error,
    normalize_service,
    stamp_region,
)
from cloudlet.controlplane.security_api import SecurityParts, add_security_routes, json_body
from cloudlet.controlplane.services import ServiceManager
from cloudlet.controlplane.telemetry_api import add_telemetry_routes
from cloudlet.domain.errors import CloudletError, InvalidError, NotFoundError, UnauthorizedError
from cloudlet.domain.models import API_VERSION, Service
from cloudlet.telemetry.collector import Telemetry

ALL_NAMESPACES = "/apis/serving.knative.dev/v1"
KNATIVE = ALL_NAMESPACES + "/namespaces/{namespace}"
IAM = "/v1/projects/{project}/locations/{location}/services/{service}"
MAX_BODY = 1 << 20
PUBLIC = ("/healthz", "/version")


def status_body(error: CloudletError) -> dict[str, Any]:
    details: dict[str, Any] = {}
    if error.field:
        # kubectl prints "FIELD: MESSAGE" for each cause, so the cause omits the field
        details["causes"] = [{"field": error.field, "message": field_message(error)}]
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": error.message,
        "reason": error.reason,
        "details": details,
        "code": error.status,
        "error": google_error(error),  # what gcloud prints; kubectl reads the Status fields
    }


def _error_response(error: CloudletError) -> JSONResponse:
    return JSONResponse(status_body(error), status_code=error.status)


async def _raw_body(request: Request) -> bytes:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise InvalidError(f"body: larger than {MAX_BODY} bytes", field="body")
    return raw


async def _json_body(request: Request) -> Any:
    raw = await _raw_body(request)
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidError(f"body: not valid JSON ({exc})", field="body") from None


def _dry_run(request: Request) -> bool:
    return request.query_params.get("dryRun", "") in ("All", "all", "true")


def _selector_service(request: Request) -> str | None:
    """The service named in ``labelSelector=serving.knative.dev/service=NAME``, if any."""
    for clause in request.query_params.get("labelSelector", "").split(","):
        key, _, value = clause.partition("=")
        if key.strip() in ("serving.knative.dev/service", "serving.knative.dev/configuration"):
            return value.strip().lstrip("=")
    return None


def _list(kind: str, items: list[dict[str, Any]], request: Request) -> dict[str, Any]:
    """A Knative list, or the Table `kubectl get` asks for."""
    if request.query_params.get("watch") in ("true", "1"):
        raise InvalidError(
            "watch: Cloudlet does not stream changes; poll with `kubectl get` instead of "
            "`--watch` or `kubectl wait`",
            field="watch",
        )
    if kubectl.wants_table(request.headers.get("accept", "")):
        return kubectl.table(kind, items, request.query_params.get("includeObject"))
    return {"apiVersion": API_VERSION, "kind": f"{kind}List", "metadata": {}, "items": items}


def _one(kind: str, item: dict[str, Any], request: Request) -> dict[str, Any]:
    if kubectl.wants_table(request.headers.get("accept", "")):
        return kubectl.table(kind, [item], request.query_params.get("includeObject"))
    return item


ImageCheck = Callable[[str], Awaitable[object]]


def _image(body: Any) -> str | None:
    try:
        return str(body["spec"]["template"]["spec"]["containers"][0]["image"])
    except (KeyError, IndexError, TypeError):
        return None


def build_api(
    services: ServiceManager,
    token: str,
    check_image: ImageCheck | None = None,
    metrics: Callable[[], str] | None = None,
    builds: BuildService | None = None,
    security: SecurityParts | None = None,
    telemetry: Telemetry | None = None,
) -> FastAPI:
    """The FastAPI app for one server; ``token`` guards every route but /healthz, /version.

    ``check_image`` admits a service only if its image exists, so a typo in ``--image``
    is refused before anything is stored.
    """
    app = FastAPI(title="Cloudlet control API (Knative Serving v1)", version="1")
    app.state.check_image = check_image

    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.url.path not in PUBLIC and not _authorized(request, token):
            return _error_response(
                UnauthorizedError(
                    "missing or invalid bearer token: the CLI reads it from CLOUDLET_HOME/token"
                )
            )
        try:
            return await call_next(request)
        except CloudletError as error:
            return _error_response(error)

    app.add_exception_handler(CloudletError, _handle)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _bad_parameter)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    _routes_services(app, services)
    _routes_revisions(app, services)
    _routes_derived(app, services)
    _routes_iam(app, services)
    add_discovery_routes(app)
    add_gcloud_routes(app, services)
    add_build_routes(app, builds)
    add_security_routes(app, security)
    add_telemetry_routes(app, telemetry)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            metrics() if metrics else "", media_type="text/plain; version=0.0.4"
        )

    @app.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unknown(path: str) -> None:
        raise NotFoundError(f"no such API path: /{path}")

    return app


async def _handle(_: Request, error: CloudletError) -> JSONResponse:
    return _error_response(error)


async def _bad_parameter(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own parameter checks answer in the same Status shape, naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    field = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
    return _error_response(InvalidError(f"{field}: {first.get('msg', 'invalid')}", field=field))


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (405 for an unsupported method) as Status bodies too."""
    error = CloudletError(f"{exc.detail}")
    error.status, error.user_fault = exc.status_code, exc.status_code < 500
    error.reason = str(exc.detail).replace(" ", "")
    return _error_response(error)


def _authorized(request: Request, token: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip(), token)


def _routes_services(app: FastAPI, services: ServiceManager) -> None:
    @app.get(KNATIVE + "/services")
    @app.get(ALL_NAMESPACES + "/services")
    async def list_services(request: Request, namespace: str | None = None) -> dict[str, Any]:
        return _list("Service", services.list_services(namespace), request)

    async def admit(request: Request, body: Any, current: dict[str, Any] | None) -> None:
        check = request.app.state.check_image
        image = _image(body)
        if check is None or image is None or (current and _image(current) == image):
            return
        await check(image)

    async def create(namespace: str, body: Any, request: Request) -> dict[str, Any]:
        body = normalize_service(stamp_region(body, request))
        services.create_service(namespace, body, dry_run=True)
        await admit(request, body, None)
        return services.create_service(namespace, body, _dry_run(request))

    async def replace(namespace: str, name: str, body: Any, request: Request) -> dict[str, Any]:
        body = normalize_service(stamp_region(body, request))
        services.replace_service(namespace, name, body, dry_run=True)
        await admit(request, body, services.get_service(namespace, name))
        return services.replace_service(namespace, name, body, _dry_run(request))

    @app.post(KNATIVE + "/services", status_code=201, openapi_extra=json_body(Service))
    async def create_service(namespace: str, request: Request) -> dict[str, Any]:
        return await create(namespace, await _json_body(request), request)

    @app.get(KNATIVE + "/services/{name}")
    async def get_service(namespace: str, name: str, request: Request) -> dict[str, Any]:
        return _one("Service", services.get_service(namespace, name), request)

    @app.put(KNATIVE + "/services/{name}", openapi_extra=json_body(Service))
    async def replace_service(namespace: str, name: str, request: Request) -> dict[str, Any]:
        return await replace(namespace, name, await _json_body(request), request)

    @app.patch(KNATIVE + "/services/{name}")
    async def patch_service(
        namespace: str, name: str, request: Request, response: Response
    ) -> dict[str, Any]:
        kind = kubectl.patch_kind(request.headers.get("content-type", ""))
        patch = kubectl.parse_patch(await _raw_body(request), kind)
        if kind == kubectl.APPLY_PATCH and services.service_record(namespace, name) is None:
            response.status_code = 201  # server-side apply creates what is missing
            return await create(namespace, kubectl.applied_object(patch, name), request)
        body = kubectl.merge_patch(services.get_service(namespace, name), patch)
        return await replace(namespace, name, body, request)

    @app.delete(KNATIVE + "/services/{name}")
    async def delete_service(namespace: str, name: str) -> dict[str, Any]:
        services.delete_service(namespace, name)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Success",
            "details": {"name": name, "group": "serving.knative.dev", "kind": "services"},
        }


def _routes_revisions(app: FastAPI, services: ServiceManager) -> None:
    @app.get(KNATIVE + "/revisions")
    @app.get(ALL_NAMESPACES + "/revisions")
    async def list_revisions(request: Request, namespace: str | None = None) -> dict[str, Any]:
        revisions = services.list_revisions(namespace, _selector_service(request))
        return _list("Revision", revisions, request)

    @app.get(KNATIVE + "/revisions/{name}")
    async def get_revision(namespace: str, name: str, request: Request) -> dict[str, Any]:
        return _one("Revision", services.get_revision(namespace, name), request)

    @app.delete(KNATIVE + "/revisions/{name}")
    async def delete_revision(namespace: str, name: str) -> dict[str, Any]:
        services.delete_revision(namespace, name)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Success",
            "details": {"name": name, "group": "serving.knative.dev", "kind": "revisions"},
        }


def _configuration(service: dict[str, Any]) -> dict[str, Any]:
    status = service.get("status", {})
    return {
        "apiVersion": API_VERSION,
        "kind": "Configuration",
        "metadata": {
            **service["metadata"],
            "labels": {
                **service["metadata"].get("labels", {}),
                "serving.knative.dev/service": service["metadata"]["name"],
            },
        },
        "spec": {"template": service["spec"]["template"]},
        "status": {
            k: status[k]
            for k in ("observedGeneration", "latestCreatedRevisionName", "latestReadyRevisionName")
            if k in status
        }
        | {"conditions": [c for c in status.get("conditions", []) if c["type"] == "Ready"]},
    }


def _route(service: dict[str, Any]) -> dict[str, Any]:
    status = service.get("status", {})
    return {
        "apiVersion": API_VERSION,
        "kind": "Route",
        "metadata": {
            **service["metadata"],
            "labels": {
                **service["metadata"].get("labels", {}),
                "serving.knative.dev/service": service["metadata"]["name"],
            },
        },
        "spec": {"traffic": service["spec"]["traffic"]},
        "status": {
            k: status[k] for k in ("observedGeneration", "url", "address", "traffic") if k in status
        }
        | {"conditions": [c for c in status.get("conditions", []) if c["type"] == "Ready"]},
    }


def _routes_derived(app: FastAPI, services: ServiceManager) -> None:
    for plural, make in (("configurations", _configuration), ("routes", _route)):
        kind = make.__name__.strip("_").capitalize()

        async def list_all(
            namespace: str, request: Request, make: Any = make, kind: str = kind
        ) -> dict[str, Any]:
            return _list(kind, [make(s) for s in services.list_services(namespace)], request)

        async def get_one(
            namespace: str, name: str, request: Request, make: Any = make, kind: str = kind
        ) -> dict[str, Any]:
            return _one(kind, dict(make(services.get_service(namespace, name))), request)

        app.add_api_route(KNATIVE + f"/{plural}", list_all, methods=["GET"])
        app.add_api_route(KNATIVE + f"/{plural}/{{name}}", get_one, methods=["GET"])


def _routes_iam(app: FastAPI, services: ServiceManager) -> None:
    @app.post(IAM + ":getIamPolicy")
    @app.get(IAM + ":getIamPolicy")
    async def get_policy(project: str, location: str, service: str) -> dict[str, Any]:
        return services.get_policy(project, service)

    @app.post(IAM + ":setIamPolicy")
    async def set_policy(
        project: str, location: str, service: str, request: Request
    ) -> dict[str, Any]:
        body = await _json_body(request)
        if not isinstance(body, dict) or "policy" not in body:
            raise InvalidError('policy: the body must be {"policy": {...}}', field="policy")
        return services.set_policy(project, service, body["policy"])
