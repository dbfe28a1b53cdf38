"""The real gcloud drives a real `cloudlet server` (Cloud Run Admin API v1 / Knative REST).

gcloud runs in a scratch CLOUDSDK_CONFIG with exactly the settings `cloudlet gcloud-config
--format env` prints, so these tests also check that what Cloudlet tells users works.
`--platform managed` needs the /etc/hosts line it prints (gcloud puts the region in front
of the host name); `--platform kubernetes` needs the HTTPS listener on port 443, which each
test server binds on a loopback address of its own.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_SCALING, CloudletServer

PROJECT = "seed-project"
REGION = "europe-west1"
GCLOUD_TIMEOUT = 180
# Variables of this machine that would send gcloud elsewhere or override the kubeconfig's CA.
FOREIGN_ENV = ("CLOUDSDK_", "CLOUDLET_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


def require_tool(name: str) -> str:
    """The tool's path; skip without it on a developer machine, fail in CI."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is not installed in CI; install it in scripts/setup.sh")
    pytest.skip(f"{name} is not installed")


def free_loopback_address() -> str:
    """A 127.x.y.z address whose port 443 is free, so parallel servers never share one."""
    for _ in range(20):
        address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
        with socket.socket() as probe:
            try:
                probe.bind((address, 443))
            except PermissionError:
                pytest.fail("gcloud --platform kubernetes needs port 443: run the tests as root")
            except OSError:
                continue
        return address
    raise RuntimeError("no loopback address with a free port 443")


def ensure_hosts_line(line: str, hosts: Path = Path("/etc/hosts")) -> None:
    """Add the line `cloudlet gcloud-config` asks for, unless its names already resolve."""
    address, *names = line.split()
    if all(_resolves_to(name, address) for name in names):
        return
    try:
        with hosts.open("a") as handle:
            handle.write(f"\n{line}\n")
    except PermissionError:
        pytest.fail(f"gcloud needs this line in {hosts}: {line}")


def _resolves_to(name: str, address: str) -> bool:
    try:
        return socket.gethostbyname(name) == address
    except OSError:
        return False


class Gcloud:
    """The real gcloud with a scratch configuration pointed at one Cloudlet server."""

    def __init__(self, server: CloudletServer, config_dir: Path) -> None:
        printed = server.cli("gcloud-config", "--format", "env", "--project", PROJECT).stdout
        self.hosts_line = printed.splitlines()[0].removeprefix("# /etc/hosts needs: ")
        base = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
        scratch = {"CLOUDSDK_CONFIG": str(config_dir), "TERM": "dumb"}  # dumb: no ANSI codes
        self.env = base | _exports(printed) | scratch
        self.server = server

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["gcloud", *args, "--quiet"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=GCLOUD_TIMEOUT,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"gcloud {shlex.join(args)} exited {done.returncode}:\n{done.stdout}\n"
                f"{done.stderr}\n--- server log ---\n{self.server.log.read_text()[-3000:]}"
            )
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--format", "json").stdout)


def _exports(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = shlex.split(value)[0]
    return env


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, testapp_image: str
) -> Iterator[CloudletServer]:
    require_tool("gcloud")
    address = free_loopback_address()
    flags = [*FAST_SCALING, "--api-tls-port", "443", "--api-tls-host", address]
    srv = CloudletServer(tmp_path_factory.mktemp("cloudlet-home"), flags)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.remove_containers()


@pytest.fixture(scope="module")
def gcloud(server: CloudletServer, tmp_path_factory: pytest.TempPathFactory) -> Gcloud:
    tool = Gcloud(server, tmp_path_factory.mktemp("gcloud-config"))
    ensure_hosts_line(tool.hosts_line)
    return tool


def stored_services(server: CloudletServer, namespace: str) -> list[str]:
    """Service names as the control API has them (not as gcloud says)."""
    token = (server.home / "token").read_text().strip()
    response = httpx.get(
        f"{server.api}/apis/serving.knative.dev/v1/namespaces/{namespace}/services",
        headers={"Authorization": f"Bearer {token}"},
    )
    response.raise_for_status()
    return [item["metadata"]["name"] for item in response.json()["items"]]


def traffic_of(service: dict[str, Any]) -> list[tuple[str, int, str | None]]:
    return sorted(
        (t["revisionName"], t.get("percent", 0), t.get("tag")) for t in service["status"]["traffic"]
    )


def answer(server: CloudletServer, host: str, deadline: float = 60) -> httpx.Response:
    """The router's answer for ``host``, retried while a fresh route may still be settling."""
    end = time.monotonic() + deadline
    while True:
        response = httpx.get(
            f"http://127.0.0.1:{server.router_port}/",
            headers={"Host": f"{host}:{server.router_port}"},
            timeout=60,
        )
        if response.status_code == 200 or time.monotonic() > end:
            return response
        time.sleep(0.2)


def test_the_seeds_deploy_command_deploys_a_service_that_answers_through_the_router(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str
) -> None:
    done = gcloud(
        "run",
        "deploy",
        "my-service",
        "--image",
        testapp_image,
        "--project",
        PROJECT,
        "--region",
        REGION,
        "--allow-unauthenticated",
        "--platform",
        "managed",
    )

    assert "has been deployed and is serving 100 percent of traffic" in done.stderr
    assert f"Service URL: {server.url('my-service')}" in done.stderr
    response = answer(server, "my-service.localhost")
    assert response.status_code == 200
    assert response.text.startswith("hello from my-service-00001-")


def test_services_and_revisions_commands_manage_tags_traffic_and_deletion(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str
) -> None:
    public = ["--allow-unauthenticated", "--region", REGION]
    gcloud("run", "deploy", "shop", "--image", testapp_image, *public)
    gcloud(
        "run", "deploy", "shop", "--image", testapp_image, *public,
        "--no-traffic", "--tag", "t", "--update-env-vars", "STAGE=2",
    )  # fmt: skip

    described = gcloud.json("run", "services", "describe", "shop", "--region", REGION)
    first, second = sorted(t["revisionName"] for t in described["status"]["traffic"])
    assert traffic_of(described) == [(first, 100, None), (second, 0, "t")]
    assert answer(server, "t---shop.localhost").text == f"hello from {second}\n"
    assert answer(server, "shop.localhost").text == f"hello from {first}\n"

    listed = gcloud.json("run", "services", "list", "--region", REGION)
    shop = next(s for s in listed if s["metadata"]["name"] == "shop")
    assert shop["metadata"]["labels"]["cloud.googleapis.com/location"] == REGION
    revisions = gcloud.json("run", "revisions", "list", "--service", "shop", "--region", REGION)
    assert [r["metadata"]["name"] for r in revisions] == [second, first]

    gcloud("run", "services", "update-traffic", "shop", "--to-latest", "--region", REGION)
    assert answer(server, "shop.localhost").text == f"hello from {second}\n"

    gcloud("run", "services", "delete", "shop", "--region", REGION)
    assert "shop" not in stored_services(server, PROJECT)


def test_services_list_without_a_region_uses_the_global_endpoint(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str
) -> None:
    gcloud("run", "deploy", "everywhere", "--image", testapp_image, "--region", REGION)

    listed = gcloud("run", "services", "list", "--format", "value(metadata.name,region)")
    regions = gcloud("run", "regions", "list", "--format", "value(locationId)")

    assert f"everywhere\t{REGION}" in listed.stdout.splitlines()
    assert REGION in regions.stdout.split()


def test_a_name_cloudlet_refuses_fails_with_its_message_and_stores_nothing(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str
) -> None:
    too_long = "a" * 55  # gcloud allows 63 characters, Cloud Run (and Cloudlet) 49

    done = gcloud(
        "run", "deploy", too_long, "--image", testapp_image, "--region", REGION, check=False
    )

    assert done.returncode == 1
    assert f"ERROR: (gcloud.run.deploy) metadata.name: invalid service name '{too_long}'" in (
        done.stderr
    )
    assert "use 1 to 49 lowercase letters" in done.stderr
    assert too_long not in stored_services(server, PROJECT)


def test_an_unsupported_field_fails_with_cloudlets_message_and_stores_nothing(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "service.yaml"
    manifest.write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata:\n  name: probed\n"
        "spec:\n  template:\n    spec:\n      containers:\n"
        f"      - image: {testapp_image}\n        readinessProbe:\n          tcpSocket: {{}}\n"
    )

    done = gcloud("run", "services", "replace", str(manifest), "--region", REGION, check=False)

    assert done.returncode == 1
    assert (
        "ERROR: (gcloud.run.services.replace) spec.template.spec.containers[0].readinessProbe: "
        "field is not supported by Cloudlet (Cloud Run uses startupProbe and livenessProbe only)"
    ) in done.stderr
    assert "probed" not in stored_services(server, PROJECT)


def test_platform_kubernetes_deploys_updates_and_deletes_through_the_kubeconfig(
    gcloud: Gcloud, server: CloudletServer, testapp_image: str, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    server.cli("kubeconfig", "--output", str(kubeconfig))
    k8s = ["--platform", "kubernetes", "--kubeconfig", str(kubeconfig)]

    gcloud("run", "deploy", "kube", "--image", testapp_image, *k8s)
    gcloud(
        "run", "deploy", "kube", "--image", testapp_image, "--no-traffic", "--tag", "t",
        "--update-env-vars", "STAGE=2", *k8s,
    )  # fmt: skip
    listed = gcloud.json("run", "services", "list", *k8s)
    revisions = gcloud.json("run", "revisions", "list", "--service", "kube", *k8s)
    gcloud("run", "services", "update-traffic", "kube", "--to-latest", *k8s)
    described = gcloud.json("run", "services", "describe", "kube", *k8s)
    gcloud("run", "services", "delete", "kube", *k8s)

    assert [s["metadata"]["namespace"] for s in listed if s["metadata"]["name"] == "kube"] == [
        "default"
    ]
    newest, oldest = (r["metadata"]["name"] for r in revisions)
    assert (oldest[:11], newest[:11]) == ("kube-00001-", "kube-00002-")
    assert traffic_of(described) == [(newest, 0, "t"), (newest, 100, None)]
    assert "kube" not in stored_services(server, "default")
