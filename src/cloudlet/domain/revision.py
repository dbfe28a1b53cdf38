"""What a revision template means: defaults, the runtime settings derived from it, and
whether two templates are the same revision."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import (
    Container,
    ContainerPort,
    ResourceRequirements,
    RevisionTemplate,
    TemplateMeta,
    dump,
)
from cloudlet.domain.names import validate_env_name
from cloudlet.domain.probes import ProbeSettings, probe_settings
from cloudlet.domain.quantities import format_cpu, format_memory, parse_cpu, parse_memory
from cloudlet.domain.volumes import default_read_only, validate_volumes

DEFAULT_CONCURRENCY = 80
DEFAULT_TIMEOUT = 300
DEFAULT_PORT = 8080
DEFAULT_CPU = "1000m"
DEFAULT_MEMORY = "512Mi"
DEFAULT_MAX_SCALE = 100

MIN_SCALE_KEYS = ("autoscaling.knative.dev/min-scale", "autoscaling.knative.dev/minScale")
MAX_SCALE_KEYS = ("autoscaling.knative.dev/max-scale", "autoscaling.knative.dev/maxScale")
CPU_THROTTLING = "run.googleapis.com/cpu-throttling"
CPU_BOOST = "run.googleapis.com/startup-cpu-boost"
_SPEC = "spec.template.spec.containers[0]"


@dataclass(frozen=True)
class RevisionConfig:
    """The runtime meaning of a revision template, validated."""

    image: str
    port: int
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cpu_millis: int
    memory_bytes: int
    container_concurrency: int
    timeout_seconds: int
    min_scale: int
    max_scale: int
    cpu_throttling: bool
    cpu_boost: bool
    annotations: tuple[tuple[str, str], ...]
    startup_probe: ProbeSettings | None = None
    liveness_probe: ProbeSettings | None = None


def with_defaults(template: RevisionTemplate) -> RevisionTemplate:
    """The template as Cloud Run stores it: concurrency, timeout, port and limits filled in."""
    out = template.model_copy(deep=True)
    spec = out.spec
    container = spec.containers[0]
    if spec.containerConcurrency is None:
        spec.containerConcurrency = DEFAULT_CONCURRENCY
    if spec.timeoutSeconds is None:
        spec.timeoutSeconds = DEFAULT_TIMEOUT
    if not container.ports:
        container.ports = [ContainerPort(name="http1", containerPort=DEFAULT_PORT)]
    elif container.ports[0].name is None:
        container.ports[0].name = "http1"
    container.resources = container.resources or ResourceRequirements()
    default_read_only(spec)
    limits = container.resources.limits
    limits["cpu"] = format_cpu(
        parse_cpu(limits.get("cpu", DEFAULT_CPU), f"{_SPEC}.resources.limits.cpu")
    )
    limits["memory"] = format_memory(
        parse_memory(limits.get("memory", DEFAULT_MEMORY), f"{_SPEC}.resources.limits.memory")
    )
    annotations = dict(out.metadata.annotations or {})
    if not any(k in annotations for k in MAX_SCALE_KEYS):
        annotations[MAX_SCALE_KEYS[1]] = str(DEFAULT_MAX_SCALE)
    out.metadata.annotations = annotations
    return out


def _scale(annotations: dict[str, str], keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if key in annotations:
            value = annotations[key]
            if not value.strip().isdigit():
                raise InvalidError(
                    f"spec.template.metadata.annotations[{key}]: {value!r} is not a whole "
                    "number of instances",
                    field=f"spec.template.metadata.annotations.{key}",
                )
            return int(value)
    return default


def _flag(annotations: dict[str, str], key: str, default: bool) -> bool:
    value = annotations.get(key)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise InvalidError(
            f"spec.template.metadata.annotations[{key}]: use 'true' or 'false', got {value!r}",
            field=f"spec.template.metadata.annotations.{key}",
        )
    return value.lower() == "true"


def _env(template: RevisionTemplate) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, var in enumerate(template.spec.containers[0].env or []):
        field = f"{_SPEC}.env[{i}].name"
        validate_env_name(var.name, field)
        if var.name in seen:
            raise InvalidError(f"{field}: {var.name} is set twice; keep one", field=field)
        seen.add(var.name)
        if var.valueFrom is None:
            out.append((var.name, var.value or ""))
    return tuple(out)


def revision_config(template: RevisionTemplate) -> RevisionConfig:
    """Validate a defaulted template and derive what the runtime and autoscaler need."""
    spec = template.spec
    container = spec.containers[0]
    annotations = dict(template.metadata.annotations or {})
    limits = container.resources.limits if container.resources else {}
    validate_volumes(spec)
    min_scale = _scale(annotations, MIN_SCALE_KEYS, 0)
    max_scale = _scale(annotations, MAX_SCALE_KEYS, DEFAULT_MAX_SCALE)
    if max_scale and min_scale > max_scale:
        raise InvalidError(
            f"spec.template.metadata.annotations: min-scale {min_scale} is above max-scale "
            f"{max_scale}; lower --min-instances or raise --max-instances",
            field="spec.template.metadata.annotations",
        )
    return RevisionConfig(
        image=container.image,
        port=_port(container),
        command=tuple(container.command or ()),
        args=tuple(container.args or ()),
        env=_env(template),
        cpu_millis=parse_cpu(limits.get("cpu", DEFAULT_CPU), f"{_SPEC}.resources.limits.cpu"),
        memory_bytes=parse_memory(
            limits.get("memory", DEFAULT_MEMORY), f"{_SPEC}.resources.limits.memory"
        ),
        container_concurrency=spec.containerConcurrency or 0,
        timeout_seconds=spec.timeoutSeconds or DEFAULT_TIMEOUT,
        min_scale=min_scale,
        max_scale=max_scale,
        cpu_throttling=_flag(annotations, CPU_THROTTLING, True),
        cpu_boost=_flag(annotations, CPU_BOOST, True),
        annotations=tuple(sorted(annotations.items())),
        startup_probe=probe_settings(container.startupProbe, _port(container)),
        liveness_probe=probe_settings(container.livenessProbe, _port(container)),
    )


def _port(container: Container) -> int:
    return container.ports[0].containerPort if container.ports else DEFAULT_PORT


def template_key(template: RevisionTemplate) -> dict[str, Any]:
    """What identifies a revision: the template without its requested name."""
    body = dump(template)
    body["metadata"] = dump(
        TemplateMeta(labels=template.metadata.labels, annotations=template.metadata.annotations)
    )
    return body
