"""Secrets mounted as files, against a real dockerd and a real `cloudlet server`.

`--set-secrets /DIR/FILE=SECRET:VERSION` must put the version's bytes in the container at
DIR/FILE, read-only, from a host directory in RAM that goes with the container; the value
must never show in describe output, exports, logs, the databases or `docker inspect`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cloudlet.runtimes.secretfiles import CANDIDATES, RAM_FILESYSTEMS, filesystem_of
from tests.conftest import CloudletServer, require_docker, wait_for
from tests.images import TESTAPP_DIR, ensure_image
from tests.integration.test_gcloud import Gcloud, ensure_hosts_line, require_tool
from tests.integration.test_yaml import CRD, problems, strict

pytestmark = pytest.mark.docker

KEEP_ONE = ("--min-instances", "1")  # inspected containers must not scale to zero meanwhile


@pytest.fixture(scope="module")
def file_app() -> str:
    """The testapp with its /file endpoint. `ensure_image` only builds a missing tag, so
    the tag names a hash of the app's sources: an edited app gets a fresh build."""
    require_docker()
    sources = sorted(p for p in TESTAPP_DIR.iterdir() if p.is_file())
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    return ensure_image(f"cloudlet-testapp:files-{digest}", TESTAPP_DIR)


@pytest.fixture(scope="module", autouse=True)
def no_leftover_dirs(server: CloudletServer) -> Iterator[None]:
    yield
    for root in secret_roots(server):
        for parent, dirs, _ in os.walk(root):
            for name in dirs:
                os.chmod(os.path.join(parent, name), 0o700)
        shutil.rmtree(root, ignore_errors=True)


def secret_roots(server: CloudletServer) -> list[Path]:
    roots = (Path(c) / f"cloudlet-{server.owner}" for c in CANDIDATES)
    return [root for root in roots if root.is_dir()]


def create_secret(server: CloudletServer, name: str, value: str, *flags: str) -> None:
    server.cli("secrets", "create", name, "--data-file", "-", *flags, input=value)


def deploy(server: CloudletServer, service: str, image: str, *flags: str) -> Any:
    return server.cli("run", "deploy", service, "--image", image, "--allow-unauthenticated", *flags)


def read_file(server: CloudletServer, service: str, path: str, write: bool = False) -> Any:
    query = f"/file?path={path}" + ("&write=1" if write else "")
    return server.request(service, query)


def inspect(server: CloudletServer, service: str) -> tuple[str, dict[str, Any]]:
    (container,) = server.containers(service)
    out = subprocess.run(
        ["docker", "inspect", container], capture_output=True, text=True, check=True
    ).stdout
    return out, json.loads(out)[0]


def knative_schema() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def test_a_secret_file_is_read_only_in_the_container_and_its_value_never_shown(
    server: CloudletServer, file_app: str
) -> None:
    value = f"file-secret-{time.time_ns()}"
    create_secret(server, "api-key", value)
    deploy(server, "files", file_app, "--set-secrets", "/secrets/api/key=api-key:1", *KEEP_ONE)

    assert read_file(server, "files", "/secrets/api/key").text == value
    for path in ("/secrets/api/key", "/secrets/api/new"):
        refused = read_file(server, "files", path, write=True)
        assert (refused.status_code, refused.json()["errno"]) == (409, "EROFS")
    assert value not in server.request("files", "/env").text

    inspected, info = inspect(server, "files")
    (mount,) = info["Mounts"]
    assert (mount["Destination"], mount["RW"], mount["Type"]) == ("/secrets/api", False, "bind")
    source = mount["Source"]
    assert source.startswith(tuple(f"{c}/cloudlet-{server.owner}/" for c in CANDIDATES))
    mountinfo = Path("/proc/self/mountinfo").read_text()
    assert filesystem_of(source, mountinfo) in RAM_FILESYSTEMS
    assert value not in inspected

    described = yaml.safe_load(
        server.cli("run", "services", "describe", "files", "--format", "yaml").stdout
    )
    spec = described["spec"]["template"]["spec"]
    (volume,) = spec["volumes"]
    assert volume["secret"] == {"secretName": "api-key", "items": [{"key": "1", "path": "key"}]}
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": volume["name"], "mountPath": "/secrets/api", "readOnly": True}
    ]
    shown = [
        yaml.safe_dump(described),
        server.cli("run", "services", "describe", "files").stdout,
        server.cli("run", "services", "describe", "files", "--format", "export").stdout,
        server.cli("run", "services", "describe", "files", "--format", "json").stdout,
        server.cli("run", "revisions", "list", "--format", "yaml").stdout,
        server.log.read_text(),
    ]
    assert "/secrets/api/key: api-key:1" in shown[1]
    for text in shown:
        assert value not in text
    for database in server.home.glob("*.db*"):
        assert value.encode() not in database.read_bytes()

    server.cli("run", "services", "delete", "files", "--quiet")
    wait_for(lambda: not Path(source).exists(), 30, "the secret dir to go with its container")
    assert server.containers("files") == []


def test_a_missing_secret_version_is_refused_at_deploy_naming_the_field(
    server: CloudletServer, file_app: str
) -> None:
    create_secret(server, "short", "only-one-version")
    done = server.cli(
        "run", "deploy", "missing", "--image", file_app,
        "--set-secrets", "/etc/app/token=short:9", check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "spec.template.spec.volumes[0].secret: secret 'short' has no version '9'" in (
        done.stderr
    )
    assert "only-one-version" not in done.stderr + done.stdout
    listed = server.cli("run", "services", "list", "--format", "json").stdout
    assert '"missing"' not in listed  # nothing stored


def test_a_described_service_with_secret_files_round_trips_through_replace(
    server: CloudletServer, file_app: str, tmp_path: Path
) -> None:
    create_secret(server, "config", "v1-contents")
    server.cli("secrets", "versions", "add", "config", "--data-file", "-", input="v2-contents")
    deploy(server, "roundtrip", file_app, "--set-secrets", "/srv/conf/app.ini=config:1")
    body = yaml.safe_load(
        server.cli("run", "services", "describe", "roundtrip", "--format", "yaml").stdout
    )
    assert problems(knative_schema(), body) == []
    path = tmp_path / "roundtrip.yaml"
    path.write_text(yaml.safe_dump(body))
    server.cli("run", "services", "replace", str(path))
    revisions = server.cli("run", "revisions", "list", "--service", "roundtrip", "--format", "json")
    assert len(json.loads(revisions.stdout)) == 1  # the same template: no new revision

    spec = body["spec"]["template"]["spec"]
    spec["volumes"][0]["secret"]["items"] = [{"key": "latest", "path": "latest.ini"}]
    spec["containers"][0]["volumeMounts"][0].pop("readOnly")  # as Cloud Run exports it
    path.write_text(yaml.safe_dump(body))
    server.cli("run", "services", "replace", str(path))
    assert read_file(server, "roundtrip", "/srv/conf/latest.ini").text == "v2-contents"
    assert read_file(server, "roundtrip", "/srv/conf/app.ini").status_code == 404
    server.cli("run", "services", "delete", "roundtrip", "--quiet")


def test_a_restarted_server_keeps_live_secret_dirs_and_removes_stale_ones(
    make_server: Any, file_app: str
) -> None:
    srv = make_server()
    srv.start()
    create_secret(srv, "kept", "kept-value")
    deploy(srv, "kept", file_app, "--set-secrets", "/secrets/kept/value=kept:1", *KEEP_ONE)
    _, info = inspect(srv, "kept")
    live = Path(info["Mounts"][0]["Source"]).parent
    srv.stop()
    stale = live.parent / "cloudlet-gone-00001-abc-xyz123"
    (stale / "0").mkdir(parents=True)
    (stale / "0" / "value").write_text("left behind")

    srv.start()
    wait_for(lambda: not stale.exists(), 30, "the stale secret dir to be swept")
    assert live.exists()
    assert read_file(srv, "kept", "/secrets/kept/value").text == "kept-value"
    srv.cli("run", "services", "delete", "kept", "--quiet")
    wait_for(lambda: not live.exists(), 30, "the adopted instance's secret dir to go")


def test_gcloud_mounts_adds_and_removes_secret_files(
    server: CloudletServer, file_app: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require_tool("gcloud")
    gcloud = Gcloud(server, tmp_path_factory.mktemp("gcloud-config"))
    ensure_hosts_line(gcloud.hosts_line)
    project = ("--project", "seed-project")
    create_secret(server, "gsecret", "from-gcloud", *project)
    region = ("--region", "europe-west1", "--platform", "managed")
    gcloud(
        "run", "deploy", "gfiles", "--image", file_app, "--allow-unauthenticated", *region,
        "--set-secrets", "/secrets/g/one=gsecret:1",
    )  # fmt: skip
    gcloud(
        "run",
        "services",
        "update",
        "gfiles",
        *region,
        "--update-secrets",
        "/secrets/g/two=gsecret:latest",
    )
    assert read_file(server, "gfiles", "/secrets/g/one").text == "from-gcloud"
    assert read_file(server, "gfiles", "/secrets/g/two").text == "from-gcloud"

    gcloud("run", "services", "update", "gfiles", *region, "--remove-secrets", "/secrets/g/one")
    assert read_file(server, "gfiles", "/secrets/g/one").status_code == 404
    described = gcloud.json("run", "services", "describe", "gfiles", *region)
    (volume,) = described["spec"]["template"]["spec"]["volumes"]
    assert volume["secret"]["items"] == [{"key": "latest", "path": "two"}]
    gcloud("run", "services", "delete", "gfiles", *region)
