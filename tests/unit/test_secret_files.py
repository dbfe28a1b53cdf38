"""Secrets as files: the flags (gcloud's semantics), the model's rules and start-time reads.

The volume bookkeeping of `--set/--update/--remove/--clear-secrets` was checked against
gcloud's own ``SecretEnvVarChanges`` and ``SecretVolumeChanges`` (managed platform, named
container) on 5,000 random sequences of flag changes while writing it: same volumes,
mounts and env, and the same changes refused. The wanted bodies below follow that code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from cloudlet.cli.template import TemplateFlags, apply, new_service
from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import dump, parse_service
from cloudlet.domain.revision import revision_config, with_defaults
from cloudlet.domain.volumes import SecretFileRef, secret_files
from cloudlet.runtimes.base import InstanceSpec, RuntimeFailure, SecretFile
from cloudlet.security.flags import (
    apply_secrets,
    parse_secret_refs,
    parse_secret_removals,
    secret_file_lines,
)
from cloudlet.security.secrets import SecretEnv, SecretVault
from cloudlet.store import Store

VALUE = b"file-secret-value-\x00\xff-binary"


def tokens() -> Callable[[], str]:
    """Predictable volume name parts: SECRET-t0-t1-t2, then SECRET-t3-t4-t5, ..."""
    counter = itertools.count()
    return lambda: f"t{next(counter)}"


def spec_of(*env: dict[str, Any]) -> dict[str, Any]:
    return {"containers": [{"image": "img", **({"env": list(env)} if env else {})}]}


def update(spec: dict[str, Any], text: str, token: Callable[[], str] | None = None) -> None:
    apply_secrets(spec, None, parse_secret_refs(text, "--update-secrets"), token=token or tokens())


# -- flags -------------------------------------------------------------------------------


def test_a_file_target_becomes_a_secret_volume_mounted_at_its_directory() -> None:
    spec = spec_of()
    update(spec, "/secrets/api/key=api-key:1")
    assert spec == {
        "containers": [
            {
                "image": "img",
                "volumeMounts": [{"name": "api-key-t0-t1-t2", "mountPath": "/secrets/api"}],
            }
        ],
        "volumes": [
            {
                "name": "api-key-t0-t1-t2",
                "secret": {"secretName": "api-key", "items": [{"key": "1", "path": "key"}]},
            }
        ],
    }


def test_files_of_one_secret_in_one_directory_share_a_volume() -> None:
    spec = spec_of()
    update(spec, "/s/a=db:1,/s/b=db:latest,DB=db:2")
    assert spec["volumes"][0]["secret"]["items"] == [
        {"key": "1", "path": "a"},
        {"key": "latest", "path": "b"},
    ]
    assert len(spec["containers"][0]["volumeMounts"]) == 1
    assert spec["containers"][0]["env"] == [
        {"name": "DB", "valueFrom": {"secretKeyRef": {"name": "db", "key": "2"}}}
    ]


def test_a_second_secret_in_one_directory_is_refused_naming_the_flag() -> None:
    with pytest.raises(InvalidError, match="holds files of one secret only") as caught:
        update(spec_of(), "/s/a=db:1,/s/b=other:1")
    assert caught.value.field == "--update-secrets"


def test_updating_a_file_keeps_the_other_files_of_its_directory() -> None:
    spec = spec_of()
    token = tokens()
    update(spec, "/s/a=db:1,/s/b=db:1", token)
    update(spec, "/s/a=db:2", token)
    assert spec["volumes"] == [
        {
            "name": "db-t0-t1-t2",
            "secret": {
                "secretName": "db",
                "items": [{"key": "2", "path": "a"}, {"key": "1", "path": "b"}],
            },
        }
    ]


def test_another_secret_may_replace_all_of_a_directorys_files_but_not_some() -> None:
    spec = spec_of()
    update(spec, "/s/a=db:1,/s/b=db:1")
    with pytest.raises(InvalidError, match=r"/s holds files of secret 'db' \(b\)"):
        update(spec, "/s/a=other:1")
    update(spec, "/s/a=other:1,/s/b=other:2")
    assert [v["secret"]["secretName"] for v in spec["volumes"]] == ["other"]


def test_removing_the_last_file_of_a_directory_removes_its_mount_and_volume() -> None:
    spec = spec_of()
    update(spec, "/s/a=db:1,/s/b=db:1,/t/c=api:1")
    apply_secrets(spec, None, {}, parse_secret_removals("/s/a, /t/c"))
    assert spec["volumes"][0]["secret"]["items"] == [{"key": "1", "path": "b"}]
    apply_secrets(spec, None, {}, ["/s/b"])
    assert "volumes" not in spec and "volumeMounts" not in spec["containers"][0]


def test_set_secrets_replaces_secret_env_vars_and_files_but_keeps_plain_env() -> None:
    plain = {"name": "MODE", "value": "prod"}
    spec = spec_of(plain)
    update(spec, "/s/a=db:1,OLD=db:1")
    apply_secrets(spec, parse_secret_refs("NEW=api:3", "--set-secrets"), {})
    assert spec == spec_of(
        plain, {"name": "NEW", "valueFrom": {"secretKeyRef": {"name": "api", "key": "3"}}}
    )


def test_clear_secrets_removes_every_secret_but_remove_leaves_a_plain_var_alone() -> None:
    plain = {"name": "TOKEN", "value": "not-a-secret"}
    spec = spec_of(plain)
    update(spec, "/s/a=db:1,KEY=db:1")
    apply_secrets(spec, None, {}, ["TOKEN"])
    assert plain in spec["containers"][0]["env"]
    apply_secrets(spec, None, {}, clear_secrets=True)
    assert spec == spec_of(plain)


@pytest.mark.parametrize(
    ("given", "flag"),
    [
        ({"set_secrets": {}, "clear_secrets": True}, "--set-secrets"),
        ({"set_secrets": {"A": ("s", "1")}, "remove_secrets": ["B"]}, "--set-secrets"),
        ({"clear_secrets": True, "update_secrets": {"A": ("s", "1")}}, "--clear-secrets"),
    ],
)
def test_secrets_flags_that_gcloud_keeps_apart_are_refused_together(
    given: dict[str, Any], flag: str
) -> None:
    args = {"set_secrets": None, "update_secrets": {}} | given
    with pytest.raises(InvalidError, match="cannot be combined") as caught:
        apply_secrets(spec_of(), **args)
    assert caught.value.field == flag


@pytest.mark.parametrize(
    "text",
    [
        "/key=s:1",
        "/a//b=s:1",
        "/a/../b=s:1",
        "/a/./b=s:1",
        "/a/b/=s:1",
        "/tmp/key=s:1",
        "/proc/self/key=s:1",
        "/dev/key=s:1",
        "/a:b/key=s:1",
        "/s/key=bad/name:1",
        "/s/key=s:v2",
    ],
)
def test_malformed_file_targets_name_the_flag(text: str) -> None:
    with pytest.raises(InvalidError) as caught:
        parse_secret_refs(text, "--set-secrets")
    assert caught.value.field == "--set-secrets"


def test_file_targets_parse_like_env_targets_with_latest_as_the_default() -> None:
    assert parse_secret_refs(" /secrets/api/key=api-key, ENV=db:2", "--set-secrets") == {
        "/secrets/api/key": ("api-key", "latest"),
        "ENV": ("db", "2"),
    }


def test_deploy_flags_reach_the_template_and_describe_lists_the_files() -> None:
    flags = TemplateFlags(
        image="img", update_secrets=parse_secret_refs("/s/key=api:1", "--update-secrets")
    )
    service = apply(new_service("web", "default"), flags)
    spec = service["spec"]["template"]["spec"]
    assert spec["volumes"][0]["secret"] == {
        "secretName": "api",
        "items": [{"key": "1", "path": "key"}],
    }
    assert secret_file_lines(spec) == ["/s/key: api:1"]
    again = apply(service, TemplateFlags(remove_secrets=["/s/key"]))
    assert "volumes" not in again["spec"]["template"]["spec"]


# -- the model -----------------------------------------------------------------------------


def service_with(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"template": {"spec": spec}},
    }


def admitted(spec: dict[str, Any]) -> dict[str, Any]:
    """What the control plane stores for a template: parsed, defaulted, validated."""
    template = with_defaults(parse_service(service_with(spec)).spec.template)
    revision_config(template)
    return dump(template)["spec"]


def cloud_run_spec(**changes: Any) -> dict[str, Any]:
    volume = {
        "name": "api-key-abc",
        "secret": {"secretName": "api-key", "items": [{"key": "1", "path": "key"}]},
    }
    mount = {"name": "api-key-abc", "mountPath": "/secrets/api"}
    spec: dict[str, Any] = {
        "containers": [{"image": "img", "volumeMounts": [mount]}],
        "volumes": [volume],
    }
    for path, value in changes.items():
        _set(spec, path.split("__"), value)
    return spec


def _set(body: Any, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        body = body[int(part)] if part.isdigit() else body[part]
    last = path[-1]
    if last.isdigit():
        body[int(last)] = value
    else:
        body[last] = value


def test_a_cloud_run_secret_volume_is_accepted_and_its_mount_is_read_only() -> None:
    spec = admitted(cloud_run_spec())
    assert spec["volumes"] == cloud_run_spec()["volumes"]
    assert spec["containers"][0]["volumeMounts"] == [
        {"name": "api-key-abc", "mountPath": "/secrets/api", "readOnly": True}
    ]
    assert secret_files(spec) == [SecretFileRef("/secrets/api", "key", "api-key", "1", 0o444)]


M = "spec.template.spec.containers[0].volumeMounts"
V = "spec.template.spec.volumes"
MOUNT = {"name": "api-key-abc", "mountPath": "/secrets/api"}


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"volumes__0": {"name": "v", "emptyDir": {}}}, f"{V}[0].emptyDir", "only secret volumes"),
        ({"volumes__0": {"name": "v", "nfs": {}}}, f"{V}[0].nfs", "only secret volumes"),
        ({"volumes__0": {"name": "api-key-abc"}}, f"{V}[0].secret", "secret volumes only"),
        ({"containers__0__volumeMounts__0__name": "nope"}, f"{M}[0].name", "not declared"),
        ({"containers__0__volumeMounts__0__mountPath": "secrets"}, f"{M}[0].mountPath", "absolute"),
        (
            {"containers__0__volumeMounts__0__mountPath": "/"},
            f"{M}[0].mountPath",
            "whole filesystem",
        ),
        ({"containers__0__volumeMounts__0__mountPath": "/tmp"}, f"{M}[0].mountPath", "/tmp"),
        ({"containers__0__volumeMounts__0__mountPath": "/tmp/s"}, f"{M}[0].mountPath", "/tmp"),
        ({"containers__0__volumeMounts__0__mountPath": "/proc"}, f"{M}[0].mountPath", "/proc"),
        ({"containers__0__volumeMounts__0__mountPath": "/sys/x"}, f"{M}[0].mountPath", "/sys"),
        ({"containers__0__volumeMounts__0__mountPath": "/dev"}, f"{M}[0].mountPath", "/dev"),
        ({"containers__0__volumeMounts__0__mountPath": "/a/../b"}, f"{M}[0].mountPath", "'..'"),
        ({"containers__0__volumeMounts__0__mountPath": "/a:b"}, f"{M}[0].mountPath", "':'"),
        (
            {"containers__0__volumeMounts": [MOUNT, {**MOUNT, "mountPath": "/secrets/api/"}]},
            f"{M}[1].mountPath",
            f"already mounted by {M}[0]",
        ),
        (
            {"containers__0__volumeMounts": [MOUNT, {**MOUNT, "mountPath": "/secrets"}]},
            f"{M}[1].mountPath",
            "nested",
        ),
        (
            {"containers__0__volumeMounts__0": {**MOUNT, "subPath": "key"}},
            f"{M}[0].subPath",
            "not supported",
        ),
        (
            {"containers__0__volumeMounts__0": {**MOUNT, "readOnly": False}},
            f"{M}[0].readOnly",
            "read-only",
        ),
        ({"volumes__0__secret__items__0__path": "../key"}, f"{V}[0].secret.items[0].path", "'..'"),
        (
            {"volumes__0__secret__items__0__path": "/key"},
            f"{V}[0].secret.items[0].path",
            "relative",
        ),
        ({"volumes__0__secret__items__0__path": "a//b"}, f"{V}[0].secret.items[0].path", "empty"),
        ({"volumes__0__secret__items__0__path": "k\0"}, f"{V}[0].secret.items[0].path", "relative"),
        ({"containers__0__volumeMounts__0__mountPath": "/s\0"}, f"{M}[0].mountPath", "NUL"),
        ({"volumes__0__secret__items__0__key": "v1"}, f"{V}[0].secret.items[0].key", "version"),
        (
            {"volumes__0__secret__items": [{"key": "1", "path": "k"}, {"key": "2", "path": "k"}]},
            f"{V}[0].secret.items[1].path",
            "collides",
        ),
        (
            {"volumes__0__secret__items": [{"key": "1", "path": "k/x"}, {"key": "2", "path": "k"}]},
            f"{V}[0].secret.items[1].path",
            "collides",
        ),
        ({"volumes__0__secret__secretName": "a/b"}, f"{V}[0].secret.secretName", "secret name"),
        ({"volumes__0__secret__defaultMode": 0o1000}, f"{V}[0].secret.defaultMode", "511"),
        ({"volumes__0__secret__optional": True}, f"{V}[0].secret.optional", "not supported"),
        ({"volumes__0__name": "a b"}, f"{V}[0].name", "volume name"),
    ],
)
def test_bad_volumes_and_mounts_are_refused_naming_the_field(
    changes: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidError) as caught:
        admitted(cloud_run_spec(**changes))
    assert caught.value.field == field
    assert caught.value.message.startswith(f"{field}: ")
    assert message in caught.value.message


def test_a_volume_declared_twice_is_refused() -> None:
    volume = cloud_run_spec()["volumes"][0]
    with pytest.raises(InvalidError, match="declared twice") as caught:
        admitted(cloud_run_spec(volumes=[volume, volume]))
    assert caught.value.field == f"{V}[1].name"


def test_an_unmounted_secret_volume_is_kept_but_gives_no_files() -> None:
    # gcloud leaves one behind when it unmounts the secrets of an unnamed container
    spec = admitted(cloud_run_spec(containers=[{"image": "img"}]))
    assert spec["volumes"][0]["name"] == "api-key-abc"
    assert secret_files(spec) == []


def test_file_modes_default_to_0444_and_are_never_writable() -> None:
    items = [{"key": "1", "path": "a", "mode": 0o640}, {"key": "2", "path": "b"}]
    spec = cloud_run_spec(
        volumes__0__secret={"secretName": "s", "items": items, "defaultMode": 0o600}
    )
    assert [f.mode for f in secret_files(admitted(spec))] == [0o440, 0o400]
    whole = cloud_run_spec(volumes__0__secret={"secretName": "s"})
    assert secret_files(admitted(whole)) == [
        SecretFileRef("/secrets/api", "s", "s", "latest", 0o444)
    ]


# -- instance start ----------------------------------------------------------------------


def start(store: Store, vault: SecretVault, spec: dict[str, Any]) -> InstanceSpec:
    store.put("revisions", "default", "web-00001-abc", {"spec": spec})
    return SecretEnv(vault, store)("default", InstanceSpec("web", "web-00001-abc", "web", "img"))


def test_each_mounted_file_is_read_at_instance_start(store: Store, vault: SecretVault) -> None:
    vault.create("default", "api-key")
    vault.add_version("default", "api-key", VALUE)
    vault.add_version("default", "api-key", b"two")
    items = [{"key": "1", "path": "key"}, {"key": "latest", "path": "dir/newest"}]
    filled = start(store, vault, admitted(cloud_run_spec(volumes__0__secret__items=items)))
    assert filled.files == (
        SecretFile("/secrets/api", "key", VALUE, 0o444),
        SecretFile("/secrets/api", "dir/newest", b"two", 0o444),
    )
    assert filled.env == ()
    assert VALUE not in repr(filled).encode()


def test_a_missing_version_fails_the_start_naming_the_file(
    store: Store, vault: SecretVault
) -> None:
    vault.create("default", "api-key")
    vault.add_version("default", "api-key", VALUE)
    spec = admitted(cloud_run_spec(volumes__0__secret__items__0__key="7"))
    with pytest.raises(RuntimeFailure, match="file /secrets/api/key: secret 'api-key' has no"):
        start(store, vault, spec)
