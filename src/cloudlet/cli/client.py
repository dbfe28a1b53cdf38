"""The CLI's HTTP client for the control API, and how it finds the server."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from cloudlet.cli.failures import ApiError
from cloudlet.settings import default_home

__all__ = ["ApiError", "Client", "discover"]

KNATIVE = "/apis/serving.knative.dev/v1/namespaces/{namespace}"


def discover(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(API base URL, token) from CLOUDLET_API/CLOUDLET_TOKEN or the server's files."""
    env = os.environ if env is None else env
    home = default_home(env)
    api = env.get("CLOUDLET_API")
    if not api:
        info = home / "server.json"
        if not info.exists():
            raise ApiError(
                f"no Cloudlet server found (no {info}); start one with `cloudlet server` "
                "(or set CLOUDLET_API to its control API URL)"
            )
        api = json.loads(info.read_text())["api"]
    token = env.get("CLOUDLET_TOKEN") or _read_token(home / "token")
    return api.rstrip("/"), token


def _read_token(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        raise ApiError(
            f"cannot read the API token at {path}; set CLOUDLET_TOKEN or "
            "CLOUDLET_HOME to the server's home"
        ) from None


class Client:
    """Knative REST calls the commands need."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, timeout=timeout, headers={"Authorization": f"Bearer {token}"}
        )
        self.base_url = base_url

    @classmethod
    def from_env(cls) -> Client:
        return cls(*discover())

    def close(self) -> None:
        self._http.close()

    def request(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise ApiError(
                f"cannot reach the Cloudlet server at {self.base_url} ({exc}); is "
                "`cloudlet server` running?"
            ) from None
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def service_path(self, namespace: str, name: str = "") -> str:
        base = KNATIVE.format(namespace=namespace) + "/services"
        return f"{base}/{name}" if name else base

    def get_service(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", self.service_path(namespace, name))
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return result

    def revisions(self, namespace: str, service: str | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": f"serving.knative.dev/service={service}"} if service else None
        path = KNATIVE.format(namespace=namespace) + "/revisions"
        items: list[dict[str, Any]] = self.request("GET", path, params=params)["items"]
        return items

    def revision_path(self, namespace: str, name: str) -> str:
        return KNATIVE.format(namespace=namespace) + f"/revisions/{name}"

    def iam(self, namespace: str, region: str, service: str, verb: str) -> str:
        return f"/v1/projects/{namespace}/locations/{region}/services/{service}:{verb}"


def _error(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    message = body.get("message") or body.get("error", {}).get("message") or response.text
    return ApiError(message, response.status_code, body.get("reason", ""))
