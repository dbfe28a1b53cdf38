"""Who may control the platform and who may invoke a service, against a real server."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import time
from typing import Any

import httpx
import pytest
import yaml

from cloudlet.security import keys
from cloudlet.security.tokens import mint
from tests.conftest import FAST_SCALING, CloudletServer

pytestmark = pytest.mark.docker


def _token(server: CloudletServer, account: str, audience: str | None = None) -> str:
    args = ["--account", account] + (["--audiences", audience] if audience else [])
    return server.cli("auth", "print-identity-token", *args).stdout.strip()


def _call(server: CloudletServer, service: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return server.request(service, "/", headers=headers)


@pytest.fixture(scope="module")
def private(server: CloudletServer, testapp_image: str) -> str:
    """A service deployed with neither --allow-unauthenticated nor its opposite."""
    server.cli("run", "deploy", "private", "--image", testapp_image)
    return "private"


def _api_routes(server: CloudletServer, token: str) -> list[tuple[str, str]]:
    spec = httpx.get(f"{server.api}/openapi.json", headers={"Authorization": f"Bearer {token}"})
    routes = []
    for path, methods in spec.json()["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        routes += [(method.upper(), concrete) for method in methods]
    return routes


def test_every_control_api_route_refuses_a_missing_or_wrong_token_and_changes_nothing(
    server: CloudletServer, private: str
) -> None:
    token = (server.home / "token").read_text().strip()
    before = _stored(server)
    routes = _api_routes(server, token)
    assert len(routes) > 15
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            answer = httpx.request(method, server.api + path, headers=headers, json={})
            assert answer.status_code == 401, (method, path, answer.text)
            assert answer.json()["reason"] == "Unauthorized"
    assert _stored(server) == before


def _stored(server: CloudletServer) -> list[tuple[str, str, Any]]:
    """Each service's name, resourceVersion and spec: what a write would change."""
    listed = json.loads(server.cli("run", "services", "list", "--format", "json").stdout)
    return [(s["metadata"]["name"], s["metadata"]["resourceVersion"], s["spec"]) for s in listed]


def test_the_token_file_is_readable_by_its_owner_only(server: CloudletServer) -> None:
    for path in (server.home / "token", server.home / "keys" / "identity.pem"):
        assert path.stat().st_mode & 0o777 == 0o600


def test_a_new_service_is_private_and_asks_for_a_token(
    server: CloudletServer, private: str
) -> None:
    answer = _call(server, private, None)
    assert answer.status_code == 401
    assert "print-identity-token" in answer.text


def test_a_token_for_another_audience_is_refused(server: CloudletServer, private: str) -> None:
    server.cli(
        "run", "services", "add-iam-policy-binding", private,
        "--member", "user:ada", "--role", "roles/run.invoker",
    )  # fmt: skip
    token = _token(server, "ada", server.url("someone-else"))
    assert _call(server, private, token).status_code == 401


def test_an_expired_token_is_refused(server: CloudletServer, private: str) -> None:
    token = mint(keys.signing_key(server.home), "ada", server.url(private), time.time() - 7200)
    answer = _call(server, private, token)
    assert answer.status_code == 401
    assert "expired" in answer.text


def test_a_tampered_token_is_refused(server: CloudletServer, private: str) -> None:
    header, claims, signature = _token(server, "ada", server.url(private)).split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    assert _call(server, private, f"{header}.{claims}.{flipped}").status_code == 401


def test_a_valid_token_of_someone_without_the_invoker_role_gets_403(
    server: CloudletServer, private: str
) -> None:
    answer = _call(server, private, _token(server, "mallory", server.url(private)))
    assert answer.status_code == 403
    assert "user:mallory" in answer.text


def test_an_invoker_gets_through_until_the_binding_is_removed(
    server: CloudletServer, private: str
) -> None:
    binding = ["--member", "user:ada", "--role", "roles/run.invoker"]
    server.cli("run", "services", "add-iam-policy-binding", private, *binding)
    token = _token(server, "ada", server.url(private))
    assert _call(server, private, token).status_code == 200
    assert _call(server, private, _token(server, "ada")).status_code == 200  # the CLI audience
    policy: dict[str, Any] = yaml.safe_load(
        server.cli("run", "services", "get-iam-policy", private).stdout
    )
    assert {"role": "roles/run.invoker", "members": ["user:ada"]} in policy["bindings"]
    server.cli("run", "services", "remove-iam-policy-binding", private, *binding)
    assert _call(server, private, token).status_code == 403


def test_allow_unauthenticated_lets_anyone_in_and_its_opposite_closes_the_door(
    server: CloudletServer, testapp_image: str
) -> None:
    server.cli("run", "deploy", "opened", "--image", testapp_image, "--allow-unauthenticated")
    assert _call(server, "opened", None).status_code == 200
    server.cli("run", "deploy", "opened", "--image", testapp_image, "--no-allow-unauthenticated")
    assert _call(server, "opened", None).status_code == 401


def test_secret_values_reach_the_container_but_never_describe_logs_or_export(
    server: CloudletServer, testapp_image: str
) -> None:
    value = "s3cr3t-" + str(time.time_ns())
    server.cli("secrets", "create", "db-pass", "--data-file", "-", input=value)
    server.cli(
        "run", "deploy", "withsecret", "--image", testapp_image, "--allow-unauthenticated",
        "--set-secrets", "DB_PASS=db-pass:latest",
    )  # fmt: skip
    assert server.request("withsecret", "/env").json()["DB_PASS"] == value
    shown = [
        server.cli("run", "services", "describe", "withsecret").stdout,
        server.cli("run", "services", "describe", "withsecret", "--format", "export").stdout,
        server.cli("run", "services", "describe", "withsecret", "--format", "json").stdout,
        server.cli("run", "revisions", "list", "--format", "yaml").stdout,
        server.cli("secrets", "list", "--format", "json").stdout,
        server.cli("secrets", "versions", "list", "db-pass", "--format", "json").stdout,
        server.log.read_text(),
    ]
    assert "db-pass" in shown[1]  # the reference is exported, the value is not
    for text in shown:
        assert value not in text
    for path in server.home.glob("cloudlet.db*"):
        assert value.encode() not in path.read_bytes()


def test_a_new_secret_version_is_picked_up_by_the_next_revision(
    server: CloudletServer, testapp_image: str
) -> None:
    server.cli("secrets", "create", "rotating", "--data-file", "-", input="one")
    server.cli(
        "run", "deploy", "rotor", "--image", testapp_image, "--allow-unauthenticated",
        "--set-secrets", "VALUE=rotating:1",
    )  # fmt: skip
    assert server.request("rotor", "/env").json()["VALUE"] == "one"
    server.cli("secrets", "versions", "add", "rotating", "--data-file", "-", input="two")
    server.cli("run", "services", "update", "rotor", "--update-secrets", "VALUE=rotating:2")
    assert server.request("rotor", "/env").json()["VALUE"] == "two"


def test_secrets_commands_refuse_bad_input_with_exit_2(server: CloudletServer) -> None:
    bad = server.cli("secrets", "create", "bad/name", "--data-file", "-", input="x", check=False)
    assert bad.returncode == 2 and "secretId" in bad.stderr
    missing = server.cli("secrets", "versions", "list", "nope", check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr
    flag = server.cli("run", "deploy", "x", "--image", "i", "--set-secrets", "A=s:zz", check=False)
    assert flag.returncode == 2 and "--set-secrets" in flag.stderr


def test_an_internal_service_answers_callers_on_this_machine(
    server: CloudletServer, testapp_image: str
) -> None:
    server.cli(
        "run", "deploy", "inside", "--image", testapp_image, "--allow-unauthenticated",
        "--ingress", "internal",
    )  # fmt: skip
    assert server.request("inside", "/").status_code == 200
    described = server.cli("run", "services", "describe", "inside", "--format", "yaml").stdout
    assert "run.googleapis.com/ingress: internal" in described


def _docker_json(*args: str) -> Any:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def _address_outside_the_cloudlet_network() -> str:
    """An address of this machine that is neither loopback nor on the cloudlet network
    (docker0's, say): a caller from there is an outsider."""
    subnet = _docker_json("network", "inspect", "cloudlet")[0]["IPAM"]["Config"][0]["Subnet"]
    listed = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    for address in re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", listed):
        ip = ipaddress.ip_address(address)
        if not ip.is_loopback and ip not in ipaddress.ip_network(subnet):
            return address
    raise AssertionError(f"this machine has no address outside loopback and {subnet}")


def test_an_internal_service_refuses_outsiders_and_answers_other_instances(
    make_server: Any, testapp_image: str
) -> None:
    srv = make_server(["--host", "0.0.0.0", *FAST_SCALING])
    srv.start()
    outside = _address_outside_the_cloudlet_network()
    common = ["--image", testapp_image, "--allow-unauthenticated"]
    srv.cli("run", "deploy", "inner", *common, "--ingress", "internal")
    srv.cli("run", "deploy", "caller", *common, "--min-instances", "1")
    host = {"Host": f"inner.localhost:{srv.router_port}"}
    assert httpx.get(f"http://127.0.0.1:{srv.router_port}/", headers=host).status_code == 200
    refused = httpx.get(f"http://{outside}:{srv.router_port}/", headers=host)
    assert refused.status_code == 404
    gateway = _docker_json("network", "inspect", "cloudlet")[0]["IPAM"]["Config"][0]["Gateway"]
    fetch = (
        "import urllib.request as u;"
        f"r=u.Request('http://{gateway}:{srv.router_port}/',headers={host!r});"
        "print(u.urlopen(r).status)"
    )
    done = subprocess.run(
        ["docker", "exec", srv.containers("caller")[0], "python3", "-c", fetch],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "200", (done.returncode, done.stderr, done.stdout)
