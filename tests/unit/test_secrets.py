"""Secrets at rest (real SQLite): sealed, versioned, resolved only into instance specs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudlet.domain.errors import AlreadyExistsError, InvalidError, NotFoundError
from cloudlet.runtimes.base import InstanceSpec, RuntimeFailure
from cloudlet.security.flags import apply_ingress, apply_secrets, parse_secret_refs
from cloudlet.security.secrets import SecretEnv, SecretVault
from cloudlet.store import Store

VALUE = b"hunter2-very-secret-value"


def test_versions_are_numbered_and_latest_is_the_newest(vault: SecretVault) -> None:
    vault.create("default", "db-pass")
    vault.add_version("default", "db-pass", b"one")
    vault.add_version("default", "db-pass", b"two")
    assert vault.value("default", "db-pass", "1") == b"one"
    assert vault.value("default", "db-pass", "latest") == b"two"
    names = [v["name"] for v in vault.versions("default", "db-pass")]
    assert names == [
        "projects/default/secrets/db-pass/versions/2",
        "projects/default/secrets/db-pass/versions/1",
    ]
    assert vault.all("default")[0]["versionCount"] == 2


def test_the_database_file_never_holds_the_plaintext(
    vault: SecretVault, store: Store, tmp_path: Path
) -> None:
    vault.create("default", "api-key")
    vault.add_version("default", "api-key", VALUE)
    store.close()
    for path in tmp_path.glob("cloudlet.db*"):
        assert VALUE not in path.read_bytes()


def test_another_key_cannot_open_a_version(vault: SecretVault, store: Store) -> None:
    vault.create("default", "api-key")
    vault.add_version("default", "api-key", VALUE)
    with pytest.raises(RuntimeFailure, match="does not decrypt"):
        SecretVault(store, os.urandom(32)).value("default", "api-key", "1")


def test_a_ciphertext_moved_to_another_secret_does_not_open(
    vault: SecretVault, store: Store
) -> None:
    vault.create("default", "a")
    vault.create("default", "b")
    vault.add_version("default", "a", VALUE)
    vault.add_version("default", "b", b"other")
    a, b = store.get("secrets", "default", "a"), store.get("secrets", "default", "b")
    assert a is not None and b is not None
    store.put("secrets", "default", "b", {**b.body, "versions": a.body["versions"]})
    with pytest.raises(RuntimeFailure):
        vault.value("default", "b", "1")


def test_bad_names_duplicates_and_missing_versions_are_user_errors(vault: SecretVault) -> None:
    with pytest.raises(InvalidError, match="secretId"):
        vault.create("default", "no/slashes")
    vault.create("default", "s")
    with pytest.raises(AlreadyExistsError):
        vault.create("default", "s")
    with pytest.raises(NotFoundError, match="no version 'latest'"):
        vault.value("default", "s", "latest")
    with pytest.raises(NotFoundError):
        vault.add_version("default", "missing", b"x")
    with pytest.raises(InvalidError, match=r"payload\.data"):
        vault.add_version("default", "s", b"x" * (64 * 1024 + 1))


def test_secret_env_fills_the_instance_spec_at_start(vault: SecretVault, store: Store) -> None:
    vault.create("default", "db-pass")
    vault.add_version("default", "db-pass", VALUE)
    env = [
        {"name": "PLAIN", "value": "x"},
        {"name": "DB_PASS", "valueFrom": {"secretKeyRef": {"name": "db-pass", "key": "latest"}}},
    ]
    store.put("revisions", "default", "hello-00001-abc", {"spec": {"containers": [{"env": env}]}})
    spec = InstanceSpec("hello", "hello-00001-abc", "hello", "img", env=(("PLAIN", "x"),))
    filled = SecretEnv(vault, store)("default", spec)
    assert filled.env == (("PLAIN", "x"), ("DB_PASS", VALUE.decode()))


def test_a_missing_secret_fails_the_start_naming_the_variable(
    vault: SecretVault, store: Store
) -> None:
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "1"}}}]
    store.put("revisions", "default", "hello-00001-abc", {"spec": {"containers": [{"env": env}]}})
    spec = InstanceSpec("hello", "hello-00001-abc", "hello", "img")
    with pytest.raises(RuntimeFailure, match="env TOKEN: secret 'gone' not found"):
        SecretEnv(vault, store)("default", spec)


def test_set_secrets_flags_become_secret_key_refs() -> None:
    refs = parse_secret_refs("DB=db-pass:3,KEY=api-key:latest,BARE=api-key", "--set-secrets")
    assert refs == {
        "DB": ("db-pass", "3"),
        "KEY": ("api-key", "latest"),
        "BARE": ("api-key", "latest"),
    }
    container = {
        "env": [
            {"name": "A", "value": "1"},
            {"name": "OLD", "valueFrom": {"secretKeyRef": {"name": "x", "key": "1"}}},
        ]
    }
    apply_secrets({"containers": [container]}, {"DB": ("db-pass", "3")}, {})
    assert container["env"] == [
        {"name": "A", "value": "1"},
        {"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db-pass", "key": "3"}}},
    ]


@pytest.mark.parametrize("text", ["DB", "DB=bad/name:1", "DB=s:one", "DB=s:0", "1DB=s:1", "/x=s:1"])
def test_malformed_set_secrets_name_the_flag(text: str) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_secret_refs(text, "--set-secrets")
    assert caught.value.field == "--set-secrets"


def test_ingress_flag_sets_the_service_annotation() -> None:
    service: dict[str, dict[str, dict[str, str]]] = {"metadata": {}}
    apply_ingress(service, "internal")
    assert service["metadata"]["annotations"] == {"run.googleapis.com/ingress": "internal"}
    with pytest.raises(InvalidError, match="--ingress"):
        apply_ingress(service, "everywhere")
