"""The real kubectl drives a real `cloudlet server` with the kubeconfig `cloudlet kubeconfig`
prints (the control API's HTTPS listener, its CA, the API token)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_SCALING, CloudletServer

KNATIVE = "/apis/serving.knative.dev/v1/namespaces/default"


def manifest(name: str, image: str, greeting: str = "hi", extra: str = "") -> str:
    return (
        "apiVersion: serving.knative.dev/v1\nkind: Service\n"
        f"metadata:\n  name: {name}\n"
        "spec:\n  template:\n    spec:\n      containers:\n"
        f"      - image: {image}\n        env:\n        - name: GREETING\n"
        f"          value: {greeting}\n{extra}"
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, testapp_image: str
) -> Iterator[CloudletServer]:
    if shutil.which("kubectl") is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is not installed in CI; install it in scripts/setup.sh")
        pytest.skip("kubectl is not installed")
    srv = CloudletServer(
        tmp_path_factory.mktemp("cloudlet-home"), [*FAST_SCALING, "--api-tls-port", "0"]
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.remove_containers()


class Kubectl:
    def __init__(self, server: CloudletServer, kubeconfig: Path, cache: Path) -> None:
        self.server = server
        self.args = ["kubectl", "--kubeconfig", str(kubeconfig), "--cache-dir", str(cache)]

    def __call__(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*self.args, *args], capture_output=True, text=True, timeout=120, input=input
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n"
                f"{done.stderr}\n--- server log ---\n{self.server.log.read_text()[-3000:]}"
            )
        return done

    def apply(self, text: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self("apply", "-f", "-", *args, input=text, check=check)


@pytest.fixture(scope="module")
def kubectl(server: CloudletServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    home = tmp_path_factory.mktemp("kube")
    server.cli("kubeconfig", "--output", str(home / "config"))
    return Kubectl(server, home / "config", home / "cache")


def api(server: CloudletServer, path: str) -> httpx.Response:
    token = (server.home / "token").read_text().strip()
    return httpx.get(f"{server.api}{path}", headers={"Authorization": f"Bearer {token}"})


def ready_service(server: CloudletServer, name: str, deadline: float = 90) -> dict[str, Any]:
    """The service once its latest revision is ready (polled through the API)."""
    end = time.monotonic() + deadline
    while True:
        service: dict[str, Any] = api(server, f"{KNATIVE}/services/{name}").json()
        status = service.get("status", {})
        if status.get("latestReadyRevisionName") == status.get("latestCreatedRevisionName"):
            return service
        if time.monotonic() > end:
            raise AssertionError(f"{name} did not become ready: {status}")
        time.sleep(0.2)


def make_public(server: CloudletServer, name: str) -> None:
    server.cli(
        "run", "services", "add-iam-policy-binding", name,
        "--member", "allUsers", "--role", "roles/run.invoker",
    )  # fmt: skip


def test_kubectl_discovers_knative_kinds_with_their_short_names(kubectl: Kubectl) -> None:
    done = kubectl("api-resources", "--api-group", "serving.knative.dev", "-o", "name")

    assert done.stdout.split() == [
        "configurations.serving.knative.dev",
        "revisions.serving.knative.dev",
        "routes.serving.knative.dev",
        "services.serving.knative.dev",
    ]
    assert "ksvc" in kubectl("api-resources", "--api-group", "serving.knative.dev").stdout


def test_apply_creates_a_service_and_applying_a_change_makes_a_new_revision(
    kubectl: Kubectl, server: CloudletServer, testapp_image: str
) -> None:
    created = kubectl.apply(manifest("applied", testapp_image, "hi"))
    first = ready_service(server, "applied")["status"]["latestReadyRevisionName"]
    make_public(server, "applied")
    assert server.request("applied", "/env").json()["GREETING"] == "hi"

    configured = kubectl.apply(manifest("applied", testapp_image, "hello"))
    second = ready_service(server, "applied")["status"]["latestReadyRevisionName"]
    revisions = kubectl(
        "get", "revisions", "-l", "serving.knative.dev/service=applied", "-o", "name"
    )

    assert created.stdout == "service.serving.knative.dev/applied created\n"
    assert configured.stdout == "service.serving.knative.dev/applied configured\n"
    assert revisions.stdout.split() == [
        f"revision.serving.knative.dev/{second}",
        f"revision.serving.knative.dev/{first}",
    ]
    assert server.request("applied", "/env").json()["GREETING"] == "hello"


def test_get_ksvc_prints_knatives_columns(
    kubectl: Kubectl, server: CloudletServer, testapp_image: str
) -> None:
    kubectl.apply(manifest("listed", testapp_image))
    revision = ready_service(server, "listed")["status"]["latestReadyRevisionName"]

    header, *rows = kubectl("get", "ksvc").stdout.splitlines()

    assert header.split() == ["NAME", "URL", "LATESTCREATED", "LATESTREADY", "READY", "REASON"]
    assert ["listed", server.url("listed"), revision, revision, "True"] in [r.split() for r in rows]


def test_delete_ksvc_removes_the_service_and_its_revisions(
    kubectl: Kubectl, server: CloudletServer, testapp_image: str
) -> None:
    kubectl.apply(manifest("doomed", testapp_image))
    ready_service(server, "doomed")

    deleted = kubectl("delete", "ksvc", "doomed")
    gone = kubectl("get", "ksvc", "doomed", check=False)
    revisions = api(server, f"{KNATIVE}/revisions?labelSelector=serving.knative.dev/service=doomed")

    assert deleted.stdout == 'service.serving.knative.dev "doomed" deleted\n'
    assert gone.returncode == 1
    assert gone.stderr.startswith("Error from server (NotFound): service 'doomed' not found")
    assert revisions.json()["items"] == []


def test_bad_input_shows_cloudlets_message_and_stores_nothing(
    kubectl: Kubectl, server: CloudletServer, testapp_image: str
) -> None:
    probe = "        readinessProbe:\n          tcpSocket: {}\n"

    bad_name = kubectl.apply(manifest("Bad_Name", testapp_image), check=False)
    unsupported = kubectl.apply(manifest("probed", testapp_image, extra=probe), check=False)

    assert bad_name.returncode == 1
    assert "The request is invalid: metadata.name: invalid service name 'Bad_Name'" in (
        bad_name.stderr
    )
    assert unsupported.returncode == 1
    assert (
        "The request is invalid: spec.template.spec.containers[0].readinessProbe: field is "
        "not supported by Cloudlet (Cloud Run uses startupProbe and livenessProbe only)"
    ) in unsupported.stderr
    stored = [s["metadata"]["name"] for s in api(server, f"{KNATIVE}/services").json()["items"]]
    assert "Bad_Name" not in stored
    assert "probed" not in stored


def test_server_side_apply_and_merge_patch_change_the_live_service(
    kubectl: Kubectl, server: CloudletServer, testapp_image: str
) -> None:
    applied = kubectl.apply(manifest("patched", testapp_image), "--server-side")
    ready_service(server, "patched")

    patch = {"spec": {"template": {"spec": {"containerConcurrency": 5}}}}
    kubectl("patch", "ksvc", "patched", "--type", "merge", "-p", json.dumps(patch))
    service = ready_service(server, "patched")

    assert applied.stdout == "service.serving.knative.dev/patched serverside-applied\n"
    assert service["spec"]["template"]["spec"]["containerConcurrency"] == 5
    assert service["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "GREETING", "value": "hi"}
    ]
