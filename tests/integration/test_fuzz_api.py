"""The control API fuzzed from its own OpenAPI spec (schemathesis) at a bounded budget:
no 5xx, every refusal a Status JSON body, and the services that existed are untouched."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error

from tests.conftest import CloudletServer

pytestmark = pytest.mark.docker

EXAMPLES = 8
"""Per operation; enough to hit every validator on each route, small enough for CI."""
SKIPPED = ("/builds", "/logs/tail")
"""Builds run real image builds (the budget would go to dockerd); a log tail streams until
the client leaves, so a fuzzer waiting for its end only times out."""


def _token(server: CloudletServer) -> str:
    return (server.home / "token").read_text().strip()


@pytest.fixture(scope="module")
def keeper(server: CloudletServer, testapp_image: str) -> list[tuple[str, str, Any]]:
    server.cli("run", "deploy", "keeper", "--image", testapp_image, "--allow-unauthenticated")
    return _stored(server)


def _stored(server: CloudletServer) -> list[tuple[str, str, Any]]:
    listed = json.loads(server.cli("run", "services", "list", "--format", "json").stdout)
    return [(s["metadata"]["name"], s["metadata"]["resourceVersion"], s["spec"]) for s in listed]


@pytest.fixture(scope="module")
def api_schema(server: CloudletServer, keeper: object) -> Any:
    headers = {"Authorization": f"Bearer {_token(server)}"}
    spec = httpx.get(f"{server.api}/openapi.json", headers=headers).json()
    spec["paths"] = {p: ops for p, ops in spec["paths"].items() if not p.endswith(SKIPPED)}
    return schemathesis.openapi.from_dict(spec)


schema = schemathesis.pytest.from_fixture("api_schema")


def refusals_are_status_bodies(ctx: Any, response: Any, case: Case) -> None:
    """A 4xx says what is wrong in a Kubernetes Status body (or Google's error block)."""
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert body.get("kind") == "Status" and body.get("message"), body
        assert body.get("code") == response.status_code, body


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_the_control_api_never_fails_with_5xx(
    case: Case, server: CloudletServer, keeper: object
) -> None:
    response = case.call(
        base_url=server.api, headers={"Authorization": f"Bearer {_token(server)}"}, timeout=30
    )
    case.validate_response(response, checks=[not_a_server_error, refusals_are_status_bodies])


def test_the_services_that_existed_are_untouched_and_still_serve(
    server: CloudletServer, keeper: list[tuple[str, str, Any]]
) -> None:
    assert [s for s in _stored(server) if s[0] == "keeper"] == keeper
    assert server.request("keeper", "/").status_code == 200
