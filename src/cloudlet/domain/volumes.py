"""Secret volumes: which ones a revision may declare and mount, and the files they become.

Cloud Run mounts Secret Manager versions as files: a ``volumes[]`` entry names a secret
and maps versions to file names (``items[{key: VERSION, path: FILE}]``; no items means
one file named after the secret, holding its latest version), and
``containers[0].volumeMounts[]`` mounts it read-only at a directory. Only secret volumes
exist here. Pure: validation and derivation from the model or the stored wire form.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, NoReturn

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import KeyToPath, RevisionSpec, VolumeMount

SECRET_NAME = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
"""A Secret Manager secret id."""
SECRET_VERSION = re.compile(r"^(latest|[1-9][0-9]{0,8})$")
"""A version number or ``latest``."""
DEFAULT_MODE = 0o444
"""File mode when neither ``items[].mode`` nor ``defaultMode`` says (Cloud Run's)."""
NEVER_WRITABLE = 0o555
"""Cloud Run applies a umask of 0222 to every mode: secret files are never writable."""
RESERVED_PATHS = ("/tmp", "/proc", "/sys", "/dev")
"""Mount paths refused, with everything under them: the instance's in-memory scratch
space and the kernel's filesystems."""
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,320}$")  # SECRET-xxx-xxx-xxx fits
_SPEC = "spec.template.spec"
_MOUNTS = f"{_SPEC}.containers[0].volumeMounts"


class SecretFileRef(NamedTuple):
    """One file an instance gets: ``mount_path``/``path`` holds ``secret`` at ``version``."""

    mount_path: str
    path: str
    secret: str
    version: str
    mode: int


def mount_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be a mount directory, or None if it can."""
    if not path.startswith("/"):
        return "must be an absolute path such as /secrets/api"
    if ":" in path or "\0" in path:
        return "must not contain ':' or NUL"
    if any(part in (".", "..") for part in path.split("/")):
        return "must not contain '.' or '..' segments"
    clean = posixpath.normpath(path)
    if clean == "/":
        return "is the container's whole filesystem; mount at a directory such as /secrets"
    for reserved in RESERVED_PATHS:
        if clean == reserved or clean.startswith(reserved + "/"):
            return (
                f"is at or under {reserved}, which is reserved (/tmp is the instance's "
                "writable scratch space; /proc, /sys and /dev belong to the kernel); use a "
                "directory such as /secrets"
            )
    return None


def item_path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file inside a volume, or None if it can."""
    if not path or path.startswith("/") or "\0" in path:
        return "must be a relative file name such as 'key'"
    if path.startswith("..") or any(part in ("", ".", "..") for part in path.split("/")):
        return "must not contain empty, '.' or '..' segments"
    return None


def validate_volumes(spec: RevisionSpec) -> None:
    """Every volume a secret volume; every mount of a declared volume at a usable,
    distinct, non-nested directory; InvalidError naming the field otherwise. A volume
    nothing mounts is allowed (and ignored), as in Kubernetes: gcloud leaves one behind
    when it unmounts the secrets of a container that has no name."""
    declared = _validate_declarations(spec)
    _validate_mounts(spec.containers[0].volumeMounts or [], declared)


def _validate_declarations(spec: RevisionSpec) -> set[str]:
    names: set[str] = set()
    for i, volume in enumerate(spec.volumes or []):
        where = f"{_SPEC}.volumes[{i}]"
        if not _VOLUME_NAME.match(volume.name):
            _fail(
                f"{where}.name",
                f"{volume.name!r} is not a volume name: use letters, digits, '-', '_' and '.'",
            )
        if volume.name in names:
            _fail(f"{where}.name", f"volume {volume.name!r} is declared twice; keep one")
        names.add(volume.name)
        if volume.secret is None:
            _fail(
                f"{where}.secret",
                "a volume needs a source, and Cloudlet supports secret volumes only: "
                "secret: {secretName: NAME, items: [{key: VERSION, path: FILE}]}",
            )
        if not SECRET_NAME.match(volume.secret.secretName):
            _fail(
                f"{where}.secret.secretName",
                f"invalid secret name {volume.secret.secretName!r}: use 1 to 255 letters, "
                "digits, '-' and '_'",
            )
        _validate_items(volume.secret.items or [], f"{where}.secret.items")
    return names


def _validate_items(items: list[KeyToPath], where: str) -> None:
    paths: set[str] = set()
    for j, item in enumerate(items):
        if not SECRET_VERSION.match(item.key):
            _fail(
                f"{where}[{j}].key",
                f"{item.key!r} is not a secret version: use a version number or 'latest'",
            )
        problem = item_path_problem(item.path)
        if problem:
            _fail(f"{where}[{j}].path", f"{item.path!r} {problem}")
        clash = next((p for p in paths if _overlap(p, item.path)), None)
        if clash is not None:
            _fail(f"{where}[{j}].path", f"{item.path!r} collides with {clash!r}; use another name")
        paths.add(item.path)


def _validate_mounts(mounts: list[VolumeMount], declared: set[str]) -> None:
    seen: dict[str, int] = {}
    for j, mount in enumerate(mounts):
        where = f"{_MOUNTS}[{j}]"
        if mount.name not in declared:
            _fail(
                f"{where}.name",
                f"volume {mount.name!r} is not declared; add it to {_SPEC}.volumes or fix the name",
            )
        problem = mount_path_problem(mount.mountPath)
        if problem:
            _fail(f"{where}.mountPath", f"{mount.mountPath!r} {problem}")
        if mount.readOnly is False:
            _fail(
                f"{where}.readOnly",
                "secret volumes are mounted read-only; set it to true or remove it",
            )
        path = posixpath.normpath(mount.mountPath)
        _check_apart(path, seen, f"{where}.mountPath")
        seen[path] = j


def _check_apart(path: str, seen: dict[str, int], field: str) -> None:
    """No two mounts at one directory, nor one inside another (mount path -> index)."""
    for other, k in seen.items():
        if other == path:
            _fail(field, f"{path} is already mounted by {_MOUNTS}[{k}]; use another directory")
        if _overlap(other, path):
            _fail(
                field,
                f"{path} and {other} ({_MOUNTS}[{k}]) are nested; mount secrets at "
                "separate directories",
            )


def _nested(outer: str, inner: str) -> bool:
    return inner.startswith(outer.rstrip("/") + "/")


def _overlap(a: str, b: str) -> bool:
    """The same file, or one a directory the other is in."""
    return a == b or _nested(a, b) or _nested(b, a)


def _fail(field: str, message: str) -> NoReturn:
    raise InvalidError(f"{field}: {message}", field=field)


def default_read_only(spec: RevisionSpec) -> None:
    """Mounts of secret volumes are read-only, and say so (as Knative's defaulting does)."""
    for mount in spec.containers[0].volumeMounts or []:
        if mount.readOnly is None:
            mount.readOnly = True


def secret_files(spec: Mapping[str, Any]) -> list[SecretFileRef]:
    """The files a stored revision spec (wire form, already validated) mounts."""
    volumes = {v["name"]: v.get("secret") or {} for v in spec.get("volumes") or []}
    containers = spec.get("containers") or [{}]
    out: list[SecretFileRef] = []
    for mount in containers[0].get("volumeMounts") or []:
        source = volumes.get(mount["name"])
        if source is not None:
            out.extend(_files_of(posixpath.normpath(mount["mountPath"]), source))
    return out


def _files_of(mount_path: str, source: Mapping[str, Any]) -> Iterator[SecretFileRef]:
    secret = source["secretName"]
    default = source.get("defaultMode") or DEFAULT_MODE
    items = source.get("items") or [{"key": "latest", "path": secret}]
    for item in items:
        mode = (item.get("mode") or default) & NEVER_WRITABLE
        yield SecretFileRef(mount_path, item["path"], secret, item["key"], mode)
