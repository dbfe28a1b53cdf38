"""What the secrets flags and `--ingress` do to a Service body (pure, as gcloud does it).

`--set-secrets`, `--update-secrets`, `--remove-secrets` and `--clear-secrets` take keys
that are environment variables or, starting with '/', files (gcloud splits them so):

- ``ENV=SECRET:VERSION`` becomes Knative's ``env[].valueFrom.secretKeyRef {name: SECRET,
  key: VERSION}``, as Cloud Run stores it.
- ``/DIR/FILE=SECRET:VERSION`` becomes a secret volume ``{name, secret: {secretName:
  SECRET, items: [{key: VERSION, path: FILE}]}}`` mounted at DIR
  (``containers[0].volumeMounts[{name, mountPath: DIR}]``). One secret per directory, as on
  Cloud Run: more files of that secret in DIR join its volume. The bookkeeping is gcloud's
  for the managed platform (``SecretVolumeChanges``), so either CLI leaves the same body.

VERSION is a number or ``latest`` (the default), resolved when each instance starts.
`--set-secrets` and `--clear-secrets` first drop every secret variable and secret mount.
``--ingress`` sets the service's ``run.googleapis.com/ingress``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.names import random_token, validate_env_name
from cloudlet.domain.volumes import SECRET_VERSION, mount_path_problem, secret_files
from cloudlet.security.access import INGRESS_KEY, INGRESS_VALUES
from cloudlet.security.secrets import validate_secret_name

SecretRefs = dict[str, tuple[str, str]]
"""Target (an env var or a /DIR/FILE path) -> (secret, version)."""


def parse_secret_refs(text: str, flag: str) -> SecretRefs:
    """``ENV=NAME:VERSION,/DIR/FILE=NAME:VERSION,...`` → {target: (NAME, VERSION)}."""
    out: SecretRefs = {}
    for item in filter(None, text.split(",")):
        target, sep, ref = item.partition("=")
        target = target.strip()
        secret, colon, version = ref.partition(":")
        if not sep or not target:
            raise InvalidError(
                f"{flag}: {item!r} is not ENV=SECRET:VERSION or /DIR/FILE=SECRET:VERSION",
                field=flag,
            )
        if _is_file(target):
            _validate_file_target(target, flag)
        else:
            validate_env_name(target, flag)
        validate_secret_name(secret, flag)
        version = version if colon else "latest"
        if not SECRET_VERSION.match(version):
            raise InvalidError(
                f"{flag}: {item!r}: VERSION must be a version number or 'latest'", field=flag
            )
        out[target] = (secret, version)
    return out


def parse_secret_removals(text: str) -> list[str]:
    """``ENV,/DIR/FILE,...`` for `--remove-secrets`."""
    return [key.strip() for key in text.split(",") if key.strip()]


def _is_file(target: str) -> bool:
    return target.startswith("/")


def _validate_file_target(target: str, flag: str) -> None:
    """gcloud's rule (``/<mountPath>/<path>``, no empty, '.' or '..' segment), then the
    mount directory's own rules."""
    segments = target.split("/")
    if len(segments) < 3 or any(s in ("", ".", "..") for s in segments[1:]):
        raise InvalidError(
            f"{flag}: {target}: a secret file must be /DIR/FILE, e.g. /secrets/api/key",
            field=flag,
        )
    directory = target.rsplit("/", 1)[0]
    problem = mount_path_problem(directory)
    if problem:
        raise InvalidError(f"{flag}: {target}: the directory {directory} {problem}", field=flag)


def apply_secrets(
    spec: dict[str, Any],
    set_secrets: SecretRefs | None,
    update_secrets: SecretRefs,
    remove_secrets: Sequence[str] = (),
    clear_secrets: bool = False,
    *,
    token: Callable[[], str] = random_token,
) -> None:
    """Change a revision template's spec as the secrets flags say; ``token`` makes the
    random parts of new volume names."""
    _check_exclusive(set_secrets, update_secrets, remove_secrets, clear_secrets)
    updates = set_secrets if set_secrets is not None else update_secrets
    clear = set_secrets is not None or clear_secrets
    flag = "--set-secrets" if set_secrets is not None else "--update-secrets"
    env = {k: v for k, v in updates.items() if not _is_file(k)}
    files = {k: v for k, v in updates.items() if _is_file(k)}
    env_removes = [k for k in remove_secrets if not _is_file(k)]
    file_removes = [k for k in remove_secrets if _is_file(k)]
    if clear or env or env_removes:
        _apply_env(spec["containers"][0], env, env_removes, clear)
    if clear or files or file_removes:
        mounts = _Mounts.read(spec, clear)
        mounts.remove_files(file_removes)
        mounts.update_files(files, token, flag)
        mounts.write(spec)


def _check_exclusive(
    set_secrets: SecretRefs | None,
    update_secrets: SecretRefs,
    remove_secrets: Sequence[str],
    clear_secrets: bool,
) -> None:
    """gcloud's groups: --set, --clear, or --update with --remove."""
    given = [
        name
        for name, on in (
            ("--set-secrets", set_secrets is not None),
            ("--clear-secrets", clear_secrets),
            ("--update-secrets/--remove-secrets", bool(update_secrets or remove_secrets)),
        )
        if on
    ]
    if len(given) > 1:
        raise InvalidError(
            f"{given[0]}: cannot be combined with {given[1]}; use one of --set-secrets, "
            "--clear-secrets, or --update-secrets with --remove-secrets",
            field=given[0].split("/")[0],
        )


def _apply_env(
    container: dict[str, Any], updates: SecretRefs, removes: Sequence[str], clear: bool
) -> None:
    """Secret env vars: clear or remove them, then add or replace ``updates``."""
    env = list(container.get("env") or [])
    dropped = set(removes)
    env = [e for e in env if not (_is_secret_var(e) and (clear or e["name"] in dropped))]
    env = [e for e in env if e["name"] not in updates]
    for name, (secret, version) in updates.items():
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": version}}})
    if env:
        container["env"] = env
    else:
        container.pop("env", None)


def _is_secret_var(var: dict[str, Any]) -> bool:
    return bool((var.get("valueFrom") or {}).get("secretKeyRef"))


@dataclass
class _Mounts:
    """A template's volumes and the first container's mounts, as gcloud sees them."""

    volumes: dict[str, dict[str, Any]]
    """Every volume by name."""
    by_path: dict[str, str]
    """Mount directory -> volume name, for mounts of secret volumes."""
    originals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The mounts as they were, to keep their other fields (``readOnly``)."""
    others: list[dict[str, Any]] = field(default_factory=list)
    """Mounts of volumes that are not secrets: kept as they are."""

    @classmethod
    def read(cls, spec: dict[str, Any], clear: bool = False) -> _Mounts:
        """``clear``: as if no secret volume were mounted (`--set/--clear-secrets`)."""
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        secret = {name for name, v in volumes.items() if "secret" in v}
        mounts = spec["containers"][0].get("volumeMounts") or []
        ours = [] if clear else [m for m in mounts if m["name"] in secret]
        return cls(
            volumes,
            {m["mountPath"]: m["name"] for m in ours},
            {m["mountPath"]: m for m in ours},
            [m for m in mounts if m["name"] not in secret],
        )

    def remove_files(self, paths: Sequence[str]) -> None:
        """Drop each file from its directory's volume; an emptied mount goes."""
        for path in paths:
            directory, name = path.rsplit("/", 1)
            volume = self.by_path.get(directory)
            if volume is None:
                continue
            source = self.volumes[volume]["secret"]
            items = [i for i in source.get("items") or [] if i["path"] != name]
            if items:
                source["items"] = items
            else:
                del self.by_path[directory]

    def update_files(self, files: SecretRefs, token: Callable[[], str], flag: str) -> None:
        """Mount each file; a directory's existing files of the same secret stay."""
        users = Counter(self.by_path.values())
        for directory, source in _sources(files, flag).items():
            name = self.by_path.get(directory)
            if name is None:
                name = self._new_name(source["secretName"], token)
            elif users[name] > 1:  # shared with another directory: this one gets a copy
                users[name] -= 1
                _keep_other_items(source, self.volumes[name]["secret"])
                name = self._new_name(source["secretName"], token)
            else:
                _replace(source, self.volumes[name]["secret"], directory, flag)
            self.by_path[directory] = name
            self.volumes[name] = {"name": name, "secret": source}

    def _new_name(self, secret: str, token: Callable[[], str]) -> str:
        """gcloud's shape, SECRET-xxx-xxx-xxx, unique among the volumes."""
        while True:
            name = "-".join([secret, token(), token(), token()])
            if name not in self.volumes:
                return name

    def write(self, spec: dict[str, Any]) -> None:
        """Back into ``spec``, without the secret volumes nothing mounts any more."""
        mounts = list(self.others)
        for path, name in self.by_path.items():
            mounts.append({**self.originals.get(path, {}), "name": name, "mountPath": path})
        mounted = {m["name"] for m in mounts}
        volumes = [v for n, v in self.volumes.items() if n in mounted or "secret" not in v]
        container = spec["containers"][0]
        _set_or_drop(container, "volumeMounts", mounts)
        _set_or_drop(spec, "volumes", volumes)


def _sources(files: SecretRefs, flag: str) -> dict[str, dict[str, Any]]:
    """The files grouped by directory into secret volume sources (one secret each)."""
    out: dict[str, dict[str, Any]] = {}
    for path, (secret, version) in files.items():
        directory, name = path.rsplit("/", 1)
        source = out.setdefault(directory, {"secretName": secret, "items": []})
        if source["secretName"] != secret:
            raise InvalidError(
                f"{flag}: {path}: secret {source['secretName']!r} is already mounted in "
                f"{directory}, and a directory holds files of one secret only; use "
                "another directory",
                field=flag,
            )
        source["items"].append({"key": version, "path": name})
    return out


def _keep_other_items(source: dict[str, Any], old: dict[str, Any]) -> None:
    """Files the old volume had that the new source does not name stay."""
    named = {item["path"] for item in source["items"]}
    source["items"] += [i for i in old.get("items") or [] if i["path"] not in named]


def _replace(source: dict[str, Any], old: dict[str, Any], directory: str, flag: str) -> None:
    """The directory's volume becomes ``source``: the same secret keeps its other files;
    another secret must replace all of them."""
    if old["secretName"] == source["secretName"]:
        _keep_other_items(source, old)
        return
    kept = {i["path"] for i in old.get("items") or []} - {i["path"] for i in source["items"]}
    if kept:
        raise InvalidError(
            f"{flag}: {directory} holds files of secret {old['secretName']!r} "
            f"({', '.join(sorted(kept))}); a directory holds files of one secret only: "
            "replace all of them or use another directory",
            field=flag,
        )


def _set_or_drop(body: dict[str, Any], key: str, value: list[dict[str, Any]]) -> None:
    if value:
        body[key] = value
    else:
        body.pop(key, None)


def secret_file_lines(spec: dict[str, Any]) -> list[str]:
    """``/DIR/FILE: SECRET:VERSION`` for each mounted secret file (for describe)."""
    return [f"{f.mount_path}/{f.path}: {f.secret}:{f.version}" for f in secret_files(spec)]


def apply_ingress(service: dict[str, Any], ingress: str | None) -> None:
    if ingress is None:
        return
    if ingress not in INGRESS_VALUES:
        raise InvalidError(
            f"--ingress: {ingress!r} is not supported; use {' or '.join(INGRESS_VALUES)}",
            field="--ingress",
        )
    service["metadata"].setdefault("annotations", {})[INGRESS_KEY] = ingress
