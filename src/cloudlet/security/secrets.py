"""Secrets: named, versioned values stored encrypted at rest, resolved at instance start.

Each version's payload is sealed with AES-256-GCM under the key in
CLOUDLET_HOME/keys/secrets.key (never in the database), with ``NAMESPACE/NAME/VERSION`` as
associated data, so a ciphertext moved to another secret or version fails to open. The
API lists secrets and versions but never returns a payload; the only reader is
``SecretEnv``, which fills a revision's ``valueFrom.secretKeyRef`` variables into the
instance's environment, and its secret volumes into the instance's files, just before the
container starts.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cloudlet.domain.errors import AlreadyExistsError, InvalidError, NotFoundError
from cloudlet.domain.volumes import SECRET_NAME, SecretFileRef, secret_files
from cloudlet.runtimes.base import InstanceSpec, RuntimeFailure, SecretFile
from cloudlet.store import Store

SECRET = "secrets"
MAX_PAYLOAD = 64 * 1024
"""Bytes per version, as Secret Manager."""


def validate_secret_name(name: str, field: str = "secretId") -> str:
    if not isinstance(name, str) or not SECRET_NAME.match(name):
        raise InvalidError(
            f"{field}: invalid secret name {name!r}: use 1 to 255 letters, digits, '-' and '_'",
            field=field,
        )
    return name


def _stamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SecretVault:
    """Secrets of one server, in its store, sealed with its key."""

    def __init__(self, store: Store, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._aead = AESGCM(key)
        self._clock = clock

    def create(self, namespace: str, name: str) -> dict[str, Any]:
        validate_secret_name(name)
        if self._store.get(SECRET, namespace, name) is not None:
            raise AlreadyExistsError(
                f"secretId: secret {name!r} already exists; add a version with "
                "`cloudlet secrets versions add`",
                field="secretId",
            )
        body = {"name": name, "createTime": _stamp(self._clock()), "versions": []}
        self._store.put(SECRET, namespace, name, body, now=self._clock())
        return self._view(namespace, body)

    def add_version(self, namespace: str, name: str, payload: bytes) -> dict[str, Any]:
        if len(payload) > MAX_PAYLOAD:
            raise InvalidError(
                f"payload.data: {len(payload)} bytes is over the limit of {MAX_PAYLOAD}",
                field="payload.data",
            )
        with self._store.transaction():
            record = self._record(namespace, name)
            body = dict(record.body)
            number = 1 + max((v["version"] for v in body["versions"]), default=0)
            nonce = os.urandom(12)
            sealed = self._aead.encrypt(nonce, payload, _aad(namespace, name, number))
            version = {
                "version": number,
                "createTime": _stamp(self._clock()),
                "state": "ENABLED",
                "nonce": base64.b64encode(nonce).decode(),
                "ciphertext": base64.b64encode(sealed).decode(),
            }
            body["versions"] = [*body["versions"], version]
            self._store.put(SECRET, namespace, name, body, now=self._clock())
        return _version_view(namespace, name, version)

    def all(self, namespace: str) -> list[dict[str, Any]]:
        return [self._view(namespace, r.body) for r in self._store.list(SECRET, namespace)]

    def versions(self, namespace: str, name: str) -> list[dict[str, Any]]:
        versions = self._record(namespace, name).body["versions"]
        return [_version_view(namespace, name, v) for v in reversed(versions)]

    def delete(self, namespace: str, name: str) -> None:
        self._record(namespace, name)
        self._store.delete(SECRET, namespace, name)

    def require(self, namespace: str, name: str, version: str) -> None:
        """NotFoundError unless the secret has ``version`` (a number or ``latest``)."""
        if _pick(self._record(namespace, name).body["versions"], version) is None:
            raise NotFoundError(
                f"secret {name!r} has no version {version!r}; "
                f"`cloudlet secrets versions list {name}` shows them",
                field="version",
            )

    def value(self, namespace: str, name: str, version: str) -> bytes:
        """The payload of ``version`` (a number or ``latest``): for instance start only."""
        versions = self._record(namespace, name).body["versions"]
        chosen = _pick(versions, version)
        if chosen is None:
            raise NotFoundError(
                f"secret {name!r} has no version {version!r}; "
                f"`cloudlet secrets versions list {name}` shows them",
                field="version",
            )
        nonce = base64.b64decode(chosen["nonce"])
        sealed = base64.b64decode(chosen["ciphertext"])
        try:
            return self._aead.decrypt(nonce, sealed, _aad(namespace, name, chosen["version"]))
        except InvalidTag:
            raise RuntimeFailure(
                f"secret {name!r} version {chosen['version']} does not decrypt with "
                "CLOUDLET_HOME/keys/secrets.key (was the key replaced?)"
            ) from None

    def _record(self, namespace: str, name: str) -> Any:
        record = self._store.get(SECRET, namespace, name)
        if record is None:
            raise NotFoundError(
                f"secret {name!r} not found; `cloudlet secrets list` shows the secrets",
                field="secret",
            )
        return record

    def _view(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": f"projects/{namespace}/secrets/{body['name']}",
            "createTime": body["createTime"],
            "replication": {"automatic": {}},
            "versionCount": len(body["versions"]),
        }


def _aad(namespace: str, name: str, version: int) -> bytes:
    return f"{namespace}/{name}/{version}".encode()


def _pick(versions: list[dict[str, Any]], version: str) -> dict[str, Any] | None:
    if version == "latest":
        return versions[-1] if versions else None
    return next((v for v in versions if str(v["version"]) == version), None)


def _version_view(namespace: str, name: str, version: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"projects/{namespace}/secrets/{name}/versions/{version['version']}",
        "createTime": version["createTime"],
        "state": version["state"],
    }


class SecretEnv:
    """Fills an instance's spec at start: secret-backed environment variables, and the
    files of its secret volumes (resolved versions; never stored anywhere in plaintext)."""

    def __init__(self, vault: SecretVault, store: Store) -> None:
        self._vault = vault
        self._store = store

    def __call__(self, namespace: str, spec: InstanceSpec) -> InstanceSpec:
        revision = self._revision_spec(namespace, spec.revision)
        containers = revision.get("containers") or [{}]
        refs = secret_refs(list(containers[0].get("env") or []))
        files = secret_files(revision)
        if not refs and not files:
            return spec
        return replace(
            spec,
            env=spec.env + tuple(self._resolve(namespace, refs)),
            files=spec.files + tuple(self._read(namespace, ref) for ref in files),
        )

    def _revision_spec(self, namespace: str, revision: str) -> dict[str, Any]:
        record = self._store.get("revisions", namespace, revision)
        return dict(record.body["spec"]) if record else {}

    def _resolve(self, namespace: str, refs: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
        out = []
        for env, secret, version in refs:
            try:
                raw = self._vault.value(namespace, secret, version)
            except NotFoundError as error:
                raise RuntimeFailure(f"env {env}: {error.message}") from None
            text = raw.decode("utf-8", "replace")
            if "\0" in text:
                raise RuntimeFailure(f"env {env}: secret {secret!r} holds a NUL byte")
            out.append((env, text))
        return out

    def _read(self, namespace: str, ref: SecretFileRef) -> SecretFile:
        path = f"{ref.mount_path.rstrip('/')}/{ref.path}"
        try:
            content = self._vault.value(namespace, ref.secret, ref.version)
        except NotFoundError as error:
            raise RuntimeFailure(f"file {path}: {error.message}") from None
        return SecretFile(ref.mount_path, ref.path, content, ref.mode)


def secret_refs(env: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(variable, secret, version) for each ``valueFrom.secretKeyRef`` variable."""
    refs = []
    for var in env:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref:
            refs.append((var["name"], ref["name"], ref["key"]))
    return refs
