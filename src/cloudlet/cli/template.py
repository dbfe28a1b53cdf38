"""How deploy/update flags change a Service body (pure, as gcloud computes it client-side).

Starting from the existing service (or a new one), only the flags given change anything:
`deploy --image X` keeps the env, limits and scaling of the previous revision.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.names import validate_env_name
from cloudlet.domain.probes import ProbeKind, parse_probe_flag
from cloudlet.domain.quantities import (
    format_cpu,
    format_memory,
    parse_cpu,
    parse_duration,
    parse_memory,
)
from cloudlet.domain.revision import CPU_BOOST, CPU_THROTTLING, MAX_SCALE_KEYS, MIN_SCALE_KEYS
from cloudlet.security.flags import apply_ingress, apply_secrets

UNSET: Any = None


@dataclass
class TemplateFlags:
    """Flags of `run deploy` / `run services update`; None means "not given"."""

    image: str | None = None
    port: int | None = None
    concurrency: str | None = None
    timeout: str | None = None
    cpu: str | None = None
    memory: str | None = None
    min_instances: str | None = None
    max_instances: str | None = None
    command: str | None = None
    args: str | None = None
    set_env_vars: dict[str, str] | None = None
    update_env_vars: dict[str, str] = field(default_factory=dict)
    remove_env_vars: list[str] = field(default_factory=list)
    clear_env_vars: bool = False
    labels: dict[str, str] | None = None
    update_labels: dict[str, str] = field(default_factory=dict)
    remove_labels: list[str] = field(default_factory=list)
    clear_labels: bool = False
    revision_suffix: str | None = None
    cpu_throttling: bool | None = None
    cpu_boost: bool | None = None
    startup_probe: str | None = None
    liveness_probe: str | None = None
    set_secrets: dict[str, tuple[str, str]] | None = None
    update_secrets: dict[str, tuple[str, str]] = field(default_factory=dict)
    remove_secrets: list[str] = field(default_factory=list)
    clear_secrets: bool = False
    ingress: str | None = None


def new_service(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"template": {"metadata": {}, "spec": {"containers": [{"image": ""}]}}},
    }


def parse_pairs(text: str, flag: str) -> dict[str, str]:
    """``K=V,K2=V2`` (gcloud's ``^DELIM^`` prefix picks another delimiter)."""
    delimiter = ","
    if text.startswith("^") and text.count("^") >= 2:
        delimiter, text = text[1:].split("^", 1)
    out: dict[str, str] = {}
    for item in filter(None, text.split(delimiter)):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidError(f"{flag}: {item!r} is not KEY=VALUE", field=flag)
        out[key.strip()] = value
    return out


def _split_list(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def _whole(value: str, flag: str, low: int, high: int) -> int:
    if not value.strip().isdigit() or not low <= int(value) <= high:
        raise InvalidError(
            f"{flag}: {value!r} must be a whole number from {low} to {high}", field=flag
        )
    return int(value)


def apply(service: dict[str, Any], flags: TemplateFlags) -> dict[str, Any]:
    """A copy of ``service`` with the flags applied to its revision template."""
    out = copy.deepcopy(service)
    template = out["spec"]["template"]
    meta = template.setdefault("metadata", {})
    meta.pop("name", None)
    spec = template["spec"]
    container = spec["containers"][0]
    _apply_container(container, flags)
    _apply_spec(spec, flags)
    _apply_env(container, flags)
    apply_secrets(
        spec, flags.set_secrets, flags.update_secrets, flags.remove_secrets, flags.clear_secrets
    )
    apply_ingress(out, flags.ingress)
    _apply_scaling(meta, flags)
    meta_labels = _apply_labels(meta.get("labels") or {}, flags)
    meta["labels"] = meta_labels
    out["metadata"]["labels"] = _apply_labels(out["metadata"].get("labels") or {}, flags)
    if flags.revision_suffix:
        meta["name"] = f"{out['metadata']['name']}-{flags.revision_suffix}"
    if not container.get("image"):
        raise InvalidError(
            "--image: required for a new service; name a local image "
            "(build one with `cloudlet builds submit --tag IMAGE`)",
            field="--image",
        )
    return out


def _apply_container(container: dict[str, Any], flags: TemplateFlags) -> None:
    if flags.image is not None:
        container["image"] = flags.image
    if flags.port is not None:
        if not 1 <= flags.port <= 65535:
            raise InvalidError(f"--port: {flags.port} is not a port (1-65535)", field="--port")
        container["ports"] = [{"name": "http1", "containerPort": flags.port}]
    if flags.command is not None:
        container["command"] = _split_list(flags.command)
    if flags.args is not None:
        container["args"] = _split_list(flags.args)
    limits = container.setdefault("resources", {}).setdefault("limits", {})
    if flags.cpu is not None:
        limits["cpu"] = format_cpu(parse_cpu(flags.cpu, "--cpu"))
    if flags.memory is not None:
        limits["memory"] = format_memory(parse_memory(flags.memory, "--memory"))
    _apply_probes(container, flags)


def _apply_probes(container: dict[str, Any], flags: TemplateFlags) -> None:
    """gcloud's --startup-probe / --liveness-probe: replace the probe; "" removes it."""
    given: tuple[tuple[str | None, ProbeKind, str], ...] = (
        (flags.startup_probe, "startup", "startupProbe"),
        (flags.liveness_probe, "liveness", "livenessProbe"),
    )
    for text, kind, key in given:
        if text is None:
            continue
        probe = parse_probe_flag(text, kind)
        if probe is None:
            container.pop(key, None)
        else:
            container[key] = probe


def _apply_spec(spec: dict[str, Any], flags: TemplateFlags) -> None:
    if flags.concurrency is not None:
        value = flags.concurrency
        spec["containerConcurrency"] = (
            0 if value == "default" else _whole(value, "--concurrency", 1, 1000)
        )
        if value == "default":
            spec.pop("containerConcurrency")
    if flags.timeout is not None:
        seconds = parse_duration(flags.timeout, "--timeout")
        if not 1 <= seconds <= 3600:
            raise InvalidError(
                f"--timeout: {flags.timeout!r} must be from 1s to 3600s (1h)", field="--timeout"
            )
        spec["timeoutSeconds"] = seconds


def _apply_env(container: dict[str, Any], flags: TemplateFlags) -> None:
    """The env flags change literal variables only, as gcloud's: variables set from a
    secret stay (the secrets flags manage them), and giving one a literal value is refused."""
    env = container.get("env") or []
    literals = {e["name"]: e for e in env if "valueFrom" not in e}
    from_secrets = {e["name"]: e for e in env if "valueFrom" in e}
    if flags.clear_env_vars or flags.set_env_vars is not None:
        literals = {}
    for name in flags.remove_env_vars:
        literals.pop(name, None)
    flag = "--set-env-vars" if flags.set_env_vars else "--update-env-vars"
    for name, value in {**(flags.set_env_vars or {}), **flags.update_env_vars}.items():
        validate_env_name(name, flag)
        if name in from_secrets:
            raise InvalidError(
                f"{flag}: {name} is set from a secret; remove it with --remove-secrets {name} "
                "before giving it a literal value",
                field=flag,
            )
        literals[name] = {"name": name, "value": value}
    merged = [*literals.values(), *from_secrets.values()]
    if merged:
        container["env"] = merged
    else:
        container.pop("env", None)


def _apply_scaling(meta: dict[str, Any], flags: TemplateFlags) -> None:
    annotations = meta.setdefault("annotations", {})
    for value, keys, flag in (
        (flags.min_instances, MIN_SCALE_KEYS, "--min-instances"),
        (flags.max_instances, MAX_SCALE_KEYS, "--max-instances"),
    ):
        if value is None:
            continue
        for key in keys:
            annotations.pop(key, None)
        if value != "default":
            annotations[keys[1]] = str(_whole(value, flag, 0, 1000))
    if flags.cpu_throttling is not None:
        annotations[CPU_THROTTLING] = str(flags.cpu_throttling).lower()
    if flags.cpu_boost is not None:
        annotations[CPU_BOOST] = str(flags.cpu_boost).lower()


def _apply_labels(labels: dict[str, str], flags: TemplateFlags) -> dict[str, str]:
    """gcloud's label diff: clear, remove, then add; `--labels` is `--update-labels`."""
    out = {} if flags.clear_labels else dict(labels)
    for key in flags.remove_labels:
        out.pop(key, None)
    out.update(flags.labels or {})
    out.update(flags.update_labels)
    return out
