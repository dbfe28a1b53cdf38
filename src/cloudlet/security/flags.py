"""What `--set-secrets`, `--update-secrets` and `--ingress` do to a Service body (pure).

``ENV=SECRET:VERSION`` becomes Knative's ``env[].valueFrom.secretKeyRef {name: SECRET,
key: VERSION}`` (as Cloud Run stores it); VERSION is a number or ``latest``, resolved when
each instance starts. ``--ingress`` sets the service's ``run.googleapis.com/ingress``.
"""

from __future__ import annotations

import re
from typing import Any

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.names import validate_env_name
from cloudlet.security.access import INGRESS_KEY, INGRESS_VALUES
from cloudlet.security.secrets import validate_secret_name

_VERSION = re.compile(r"^(latest|[1-9][0-9]{0,8})$")


def parse_secret_refs(text: str, flag: str) -> dict[str, tuple[str, str]]:
    """``ENV=NAME:VERSION,...`` → {ENV: (NAME, VERSION)}."""
    out: dict[str, tuple[str, str]] = {}
    for item in filter(None, text.split(",")):
        target, sep, ref = item.partition("=")
        secret, colon, version = ref.partition(":")
        if not sep or not target:
            raise InvalidError(f"{flag}: {item!r} is not ENV=SECRET:VERSION", field=flag)
        if target.startswith("/"):
            raise InvalidError(
                f"{flag}: {target}: mounting secrets as files is not supported yet; "
                "use an environment variable, ENV=SECRET:VERSION",
                field=flag,
            )
        validate_env_name(target, flag)
        validate_secret_name(secret, flag)
        version = version if colon else "latest"
        if not _VERSION.match(version):
            raise InvalidError(
                f"{flag}: {item!r}: VERSION must be a version number or 'latest'", field=flag
            )
        out[target] = (secret, version)
    return out


def apply_secrets(
    container: dict[str, Any],
    set_secrets: dict[str, tuple[str, str]] | None,
    update_secrets: dict[str, tuple[str, str]],
) -> None:
    """Replace (``set``) or add to (``update``) the container's secret-backed env vars."""
    if set_secrets is None and not update_secrets:
        return
    env = list(container.get("env") or [])
    if set_secrets is not None:
        env = [e for e in env if not (e.get("valueFrom") or {}).get("secretKeyRef")]
    changes = {**(set_secrets or {}), **update_secrets}
    env = [e for e in env if e["name"] not in changes]
    for name, (secret, version) in changes.items():
        env.append({"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": version}}})
    if env:
        container["env"] = env
    else:
        container.pop("env", None)


def apply_ingress(service: dict[str, Any], ingress: str | None) -> None:
    if ingress is None:
        return
    if ingress not in INGRESS_VALUES:
        raise InvalidError(
            f"--ingress: {ingress!r} is not supported; use {' or '.join(INGRESS_VALUES)}",
            field="--ingress",
        )
    service["metadata"].setdefault("annotations", {})[INGRESS_KEY] = ingress
