"""What the real gcloud and kubectl need from the control API, as pure functions."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509

from cloudlet.cli.config import gcloud_properties, hosts_line, kubeconfig, render_gcloud
from cloudlet.cli.main import cli
from cloudlet.controlplane import kubectl
from cloudlet.controlplane.discovery import openapi_v3
from cloudlet.controlplane.gcloud import field_message, google_error, normalize_service
from cloudlet.controlplane.tls import issue_server_cert
from cloudlet.domain.errors import AlreadyExistsError, ConflictError, InvalidError, NotFoundError


@pytest.mark.parametrize(
    ("target", "patch", "wanted"),
    [
        ({"a": "b"}, {"a": "c"}, {"a": "c"}),
        ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
        ({"a": "b"}, {"a": None}, {}),
        ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
        ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
        ({"a": "b"}, {"a": {"b": None}}, {"a": {}}),
    ],
)
def test_merge_patch_follows_rfc_7386(target: Any, patch: Any, wanted: Any) -> None:
    assert kubectl.merge_patch(target, patch) == wanted


def test_a_strategic_merge_patch_is_refused_naming_the_types_that_work() -> None:
    with pytest.raises(InvalidError, match=r"merge-patch\+json.*kubectl patch --type merge"):
        kubectl.patch_kind("application/strategic-merge-patch+json")


def test_server_side_apply_reads_yaml_and_merge_patches_read_json() -> None:
    assert kubectl.parse_patch(b"spec:\n  a: 1\n", kubectl.APPLY_PATCH) == {"spec": {"a": 1}}
    assert kubectl.parse_patch(b'{"spec": null}', kubectl.MERGE_PATCH) == {"spec": None}
    with pytest.raises(InvalidError, match="must be an object"):
        kubectl.parse_patch(b"[1]", kubectl.MERGE_PATCH)


def test_an_applied_object_must_carry_the_name_in_the_path() -> None:
    assert kubectl.applied_object({"spec": {}}, "web")["metadata"] == {"name": "web"}
    with pytest.raises(InvalidError, match="'other' does not match the service 'web'"):
        kubectl.applied_object({"metadata": {"name": "other"}}, "web")


def test_kubectl_get_asks_for_a_table_and_gets_knatives_columns() -> None:
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    service = {
        "metadata": {"name": "web", "namespace": "default"},
        "status": {
            "url": "http://web.localhost",
            "latestCreatedRevisionName": "web-2",
            "latestReadyRevisionName": "web-1",
            "conditions": [{"type": "Ready", "status": "Unknown", "reason": "Deploying"}],
        },
    }

    table = kubectl.table("Service", [service], None)

    assert kubectl.wants_table(accept)
    assert not kubectl.wants_table("application/json")
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name", "URL", "LatestCreated", "LatestReady", "Ready", "Reason",
    ]  # fmt: skip
    assert table["rows"][0]["cells"] == [
        "web", "http://web.localhost", "web-2", "web-1", "Unknown", "Deploying",
    ]  # fmt: skip
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"


def test_errors_carry_googles_block_so_gcloud_prints_the_message() -> None:
    invalid = InvalidError("metadata.name: too long", field="metadata.name")

    block = google_error(invalid)

    assert block["status"] == "INVALID_ARGUMENT"
    assert block["message"] == "metadata.name: too long"
    assert block["details"][0]["fieldViolations"] == [
        {"field": "metadata.name", "description": "too long"}
    ]
    assert field_message(invalid) == "too long"
    assert google_error(NotFoundError("gone"))["status"] == "NOT_FOUND"
    assert google_error(AlreadyExistsError("twice"))["status"] == "ALREADY_EXISTS"
    assert google_error(ConflictError("stale"))["status"] == "ABORTED"


def test_gclouds_empty_node_selector_is_dropped_and_a_real_one_kept() -> None:
    empty = {"spec": {"template": {"spec": {"nodeSelector": {}, "containers": []}}}}
    gpu = {"spec": {"template": {"spec": {"nodeSelector": {"gpu": "l4"}}}}}

    assert normalize_service(empty)["spec"]["template"]["spec"] == {"containers": []}
    assert normalize_service(gpu)["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "l4"}
    assert normalize_service([1]) == [1]


def test_the_openapi_document_offers_field_validation_and_no_strategic_merge() -> None:
    patch = openapi_v3()["paths"][
        "/apis/serving.knative.dev/v1/namespaces/{namespace}/services/{name}"
    ]["patch"]

    assert "fieldValidation" in [p["name"] for p in patch["parameters"]]
    assert "application/strategic-merge-patch+json" not in patch["requestBody"]["content"]
    assert patch["x-kubernetes-group-version-kind"]["kind"] == "Service"


def test_gcloud_properties_point_the_run_api_at_the_host_gcloud_will_prefix() -> None:
    props = dict(
        gcloud_properties(
            "http://127.0.0.1:8090", Path("/h/token"), "default", "europe-west1", "cloudlet.local"
        )
    )

    assert props["api_endpoint_overrides/run"] == "http://cloudlet.local:8090/"
    assert props["auth/access_token_file"] == "/h/token"
    assert props["core/project"] == "default"
    assert props["component_manager/disable_update_check"] == "true"
    assert (
        hosts_line("http://127.0.0.1:8090", "cloudlet.local", ["europe-west1", "us-central1"])
        == "127.0.0.1 europe-west1-cloudlet.local us-central1-cloudlet.local cloudlet.local"
    )


def test_gcloud_config_renders_as_commands_or_as_environment_variables() -> None:
    props = [("core/project", "my project")]

    commands = render_gcloud(props, "127.0.0.1 cloudlet.local", "commands")
    env = render_gcloud(props, "127.0.0.1 cloudlet.local", "env")

    assert "gcloud config set core/project 'my project'" in commands.splitlines()
    assert env.splitlines() == [
        "# /etc/hosts needs: 127.0.0.1 cloudlet.local",
        "export CLOUDSDK_CORE_PROJECT='my project'",
    ]


def test_the_kubeconfig_names_the_server_its_ca_and_the_token() -> None:
    config = kubeconfig("https://127.0.0.1:8443", b"PEM", "secret", "team")

    assert config["clusters"][0]["cluster"] == {
        "server": "https://127.0.0.1:8443",
        "certificate-authority-data": "UEVN",
    }
    assert config["users"][0]["user"] == {"token": "secret"}
    assert config["contexts"][0]["context"]["namespace"] == "team"


def test_kubeconfig_without_an_https_listener_says_how_to_start_one(tmp_path: Path) -> None:
    (tmp_path / "server.json").write_text(json.dumps({"api": "http://127.0.0.1:1"}))

    result = CliRunner().invoke(cli, ["kubeconfig"], env={"CLOUDLET_HOME": str(tmp_path)})

    assert result.exit_code == 2
    assert "cloudlet server --api-tls-port 8443" in result.output


def test_the_server_certificate_is_signed_by_the_homes_ca_for_its_address(
    tmp_path: Path,
) -> None:
    first = issue_server_cert(tmp_path, "127.9.9.9")
    ca_before = first.ca.read_bytes()
    second = issue_server_cert(tmp_path, "127.9.9.9")

    context = ssl.create_default_context(cafile=str(second.ca))
    context.load_cert_chain(second.cert, second.key)  # the key matches the certificate
    cert = x509.load_pem_x509_certificate(second.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert second.ca.read_bytes() == ca_before  # the CA clients hold stays valid
    assert "127.9.9.9" in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)]
    assert oct((tmp_path / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"
