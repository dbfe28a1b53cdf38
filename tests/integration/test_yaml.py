"""Knative Service YAML in and out: `describe --format yaml|json` validates against Knative's
CRD schema and round-trips through `services replace`; a Cloud Run export is accepted and
what Cloud Run does not support is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, CloudletServer

pytestmark = pytest.mark.docker

CRD = REPO.parent / "shared" / "knative" / "service-crd.yaml"


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused where Kubernetes would prune them, so a
    field Knative does not know fails validation instead of vanishing silently."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        closed = "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields")
        if out.get("type") == "object" and closed and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@pytest.fixture(scope="module")
def knative() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def problems(validator: jsonschema.Draft7Validator, body: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(body)]


def describe(server: CloudletServer, name: str, fmt: str = "yaml") -> dict[str, Any]:
    out = server.cli("run", "services", "describe", name, "--format", fmt).stdout
    return dict(yaml.safe_load(out))


def replace(server: CloudletServer, path: Path, *flags: str, check: bool = True) -> Any:
    return server.cli("run", "services", "replace", str(path), *flags, check=check)


def revision_names(server: CloudletServer, service: str) -> list[str]:
    out = server.cli("run", "revisions", "list", "--service", service, "--format", "json").stdout
    return [r["metadata"]["name"] for r in json.loads(out)]


def test_the_strict_schema_catches_what_knative_does_not_know(
    knative: jsonschema.Draft7Validator,
) -> None:
    body = {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "x"},
        "spec": {"template": {"spec": {"containers": [{"image": "i", "colour": "red"}]}}},
    }
    assert any("colour" in p for p in problems(knative, body))
    body["spec"]["traffic"] = [{"percent": "ten"}]
    assert any("'ten' is not of type 'integer'" in p for p in problems(knative, body))


def test_describe_output_is_a_valid_knative_service(
    server: CloudletServer, testapp_image: str, knative: jsonschema.Draft7Validator
) -> None:
    server.cli(
        "run", "deploy", "valid", "--image", testapp_image, "--set-env-vars", "A=1",
        "--min-instances", "0", "--max-instances", "3", "--concurrency", "20", "--timeout", "60",
        "--memory", "256Mi", "--command", "python3", "--args", "/app/app.py", "--labels", "team=x",
    )  # fmt: skip
    server.cli(
        "run", "deploy", "valid", "--image", testapp_image, "--update-env-vars", "A=2",
        "--no-traffic", "--tag", "next",
    )  # fmt: skip
    for fmt in ("yaml", "json", "export"):
        body = describe(server, "valid", fmt)
        assert problems(knative, body) == [], fmt
        assert body["apiVersion"] == "serving.knative.dev/v1" and body["kind"] == "Service"
    exported = describe(server, "valid", "export")
    assert "status" not in exported and "uid" not in exported["metadata"]


def test_describe_replace_describe_gives_the_same_spec_and_no_new_revision(
    server: CloudletServer, testapp_image: str, tmp_path: Path
) -> None:
    server.cli("run", "deploy", "trip", "--image", testapp_image, "--set-env-vars", "A=1")
    server.cli(
        "run", "deploy", "trip", "--image", testapp_image, "--update-env-vars", "A=2",
        "--no-traffic", "--tag", "next",
    )  # fmt: skip
    for fmt in ("yaml", "export"):
        before = describe(server, "trip", fmt)
        path = tmp_path / f"trip.{fmt}.yaml"
        path.write_text(yaml.safe_dump(before))
        names = revision_names(server, "trip")
        replace(server, path)
        after = describe(server, "trip", fmt)
        assert after["spec"] == before["spec"]
        assert after["metadata"].get("generation") == before["metadata"].get("generation")
        assert revision_names(server, "trip") == names


CLOUD_RUN_EXPORT = """
apiVersion: serving.knative.dev/v1
kind: Service
metadata:
  name: crexport
  namespace: '123456789012'
  selfLink: /apis/serving.knative.dev/v1/namespaces/123456789012/services/crexport
  uid: 0c8b8a4e-1b2c-4d5e-8f9a-0b1c2d3e4f5a
  resourceVersion: AAYSnb3Jh0E
  generation: 3
  creationTimestamp: '2024-03-01T10:00:00.000000Z'
  labels:
    cloud.googleapis.com/location: us-central1
  annotations:
    run.googleapis.com/client-name: gcloud
    run.googleapis.com/client-version: 470.0.0
    run.googleapis.com/ingress: all
    run.googleapis.com/ingress-status: all
    run.googleapis.com/operation-id: 4b1b4f2c-8d3e-4a4a-9d0e-2f1c3b5a6d7e
    serving.knative.dev/creator: dev@example.com
    serving.knative.dev/lastModifier: dev@example.com
spec:
  template:
    metadata:
      name: crexport-00003-abc
      labels:
        client.knative.dev/nonce: qwertyuiop
        run.googleapis.com/startupProbeType: Default
      annotations:
        autoscaling.knative.dev/maxScale: '3'
        autoscaling.knative.dev/min-scale: '0'
        autoscaling.knative.dev/target: '30'
        autoscaling.knative.dev/window: 90s
        run.googleapis.com/client-name: gcloud
        run.googleapis.com/cpu-throttling: 'true'
        run.googleapis.com/startup-cpu-boost: 'false'
    spec:
      containerConcurrency: 40
      timeoutSeconds: 120
      serviceAccountName: 123456789012-compute@developer.gserviceaccount.com
      containers:
      - name: testapp-1
        image: IMAGE
        command: [python3]
        args: [/app/app.py]
        env:
        - name: MODE
          value: export
        ports:
        - name: http1
          containerPort: 8080
        resources:
          limits:
            cpu: 1000m
            memory: 256Mi
        startupProbe:
          tcpSocket:
            port: 8080
          timeoutSeconds: 240
          periodSeconds: 240
          failureThreshold: 1
  traffic:
  - latestRevision: true
    percent: 100
status:
  observedGeneration: 3
  latestReadyRevisionName: crexport-00003-abc
  url: https://crexport-abcdefghij-uc.a.run.app
"""


def cloud_run_export(image: str, name: str = "crexport") -> dict[str, Any]:
    """The export above, renamed (its revision too) to ``name``."""
    text = CLOUD_RUN_EXPORT.replace("IMAGE", image).replace("crexport", name)
    return dict(yaml.safe_load(text))


def test_a_cloud_run_export_is_accepted_and_serves(
    server: CloudletServer, testapp_image: str, tmp_path: Path
) -> None:
    path = tmp_path / "crexport.yaml"
    path.write_text(yaml.safe_dump(cloud_run_export(testapp_image)))
    done = replace(server, path)
    assert "revision [crexport-00003-abc]" in done.stdout
    server.cli(
        "run", "services", "add-iam-policy-binding", "crexport",
        "--member", "allUsers", "--role", "roles/run.invoker",
    )  # fmt: skip
    env = server.request("crexport", "/env").json()
    assert (env["MODE"], env["K_REVISION"]) == ("export", "crexport-00003-abc")
    revision = json.loads(
        server.cli("run", "revisions", "describe", "crexport-00003-abc", "--format", "json").stdout
    )
    assert (revision["spec"]["containerConcurrency"], revision["spec"]["timeoutSeconds"]) == (
        40,
        120,
    )
    assert revision["metadata"]["annotations"]["autoscaling.knative.dev/target"] == "30"
    body = describe(server, "crexport")
    assert body["metadata"]["namespace"] == "default"
    assert body["metadata"]["annotations"]["serving.knative.dev/creator"] == "dev@example.com"


def test_dry_run_validates_and_changes_nothing(
    server: CloudletServer, testapp_image: str, tmp_path: Path
) -> None:
    body = cloud_run_export(testapp_image, "dryrun")
    body["spec"]["template"]["metadata"]["name"] = "dryrun-v1"
    path = tmp_path / "dryrun.yaml"
    path.write_text(yaml.safe_dump(body))
    done = replace(server, path, "--dry-run")
    assert "Validated service [dryrun]" in done.stderr
    assert server.cli("run", "services", "describe", "dryrun", check=False).returncode == 2

    replace(server, path)
    before = describe(server, "dryrun")
    body["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "MODE", "value": "x"}]
    body["spec"]["template"]["metadata"]["name"] = "dryrun-v2"
    path.write_text(yaml.safe_dump(body))
    replace(server, path, "--dry-run")
    assert describe(server, "dryrun")["spec"] == before["spec"]
    assert revision_names(server, "dryrun") == ["dryrun-v1"]


def _container(body: dict[str, Any]) -> dict[str, Any]:
    return dict(body["spec"]["template"]["spec"]["containers"][0])


UNSUPPORTED = [
    (
        lambda b: _container(b) | {"readinessProbe": {"httpGet": {"path": "/"}}},
        "spec.template.spec.containers[0].readinessProbe: field is not supported",
    ),
    (
        lambda b: _container(b) | {"ports": [{"containerPort": 8080}, {"containerPort": 9090}]},
        "spec.template.spec.containers[0].ports: only one port is supported",
    ),
    (
        lambda b: _container(b) | {"securityContext": {"privileged": True}},
        "spec.template.spec.containers[0].securityContext: field is not supported",
    ),
    (
        lambda b: _container(b) | {"envFrom": [{"secretRef": {"name": "s"}}]},
        "spec.template.spec.containers[0].envFrom: field is not supported",
    ),
    (
        lambda b: _container(b) | {"ports": [{"name": "grpc", "containerPort": 8080}]},
        "spec.template.spec.containers[0].ports[0].name",
    ),
    (
        lambda b: _container(b) | {"volumeMounts": [{"name": "v", "mountPath": "/v"}]},
        "spec.template.spec.containers[0].volumeMounts[0].name: volume 'v' is not declared",
    ),
]


@pytest.mark.parametrize(("change", "message"), UNSUPPORTED)
def test_unsupported_container_fields_are_refused_by_name(
    server: CloudletServer, testapp_image: str, tmp_path: Path, change: Any, message: str
) -> None:
    body = cloud_run_export(testapp_image, "refused")
    body["spec"]["template"]["spec"]["containers"] = [change(body)]
    path = tmp_path / "refused.yaml"
    path.write_text(yaml.safe_dump(body))
    for flags in (("--dry-run",), ()):
        done = replace(server, path, *flags, check=False)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
    assert server.cli("run", "services", "describe", "refused", check=False).returncode == 2


BAD_SETTINGS = [
    ("spec", {"volumes": [{"name": "v", "emptyDir": {}}]}, "spec.template.spec.volumes"),
    (
        "annotations",
        {"autoscaling.knative.dev/target": "lots"},
        "autoscaling.knative.dev/target: invalid value 'lots'",
    ),
    (
        "annotations",
        {"autoscaling.knative.dev/window": "1s"},
        "autoscaling.knative.dev/window: invalid value '1s'",
    ),
    ("annotations", {"autoscaling.knative.dev/minScale": "x"}, "autoscaling.knative.dev/minScale"),
    (
        "annotations",
        {"run.googleapis.com/cpu-throttling": "maybe"},
        "run.googleapis.com/cpu-throttling",
    ),
    (
        "traffic",
        [{"latestRevision": True, "percent": 90}],
        "spec.traffic: traffic percents add up to 90",
    ),
]


@pytest.mark.parametrize(("where", "value", "message"), BAD_SETTINGS)
def test_bad_revision_settings_and_traffic_are_refused_by_name(
    server: CloudletServer,
    testapp_image: str,
    tmp_path: Path,
    where: str,
    value: Any,
    message: str,
) -> None:
    body = cloud_run_export(testapp_image, "refused2")
    if where == "spec":
        body["spec"]["template"]["spec"].update(value)
    elif where == "annotations":
        body["spec"]["template"]["metadata"]["annotations"].update(value)
    else:
        body["spec"]["traffic"] = value
    path = tmp_path / "refused2.yaml"
    path.write_text(yaml.safe_dump(body))
    done = replace(server, path, "--dry-run", check=False)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
