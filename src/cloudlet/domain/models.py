"""Knative Serving v1 resources as Cloudlet accepts them (Cloud Run's Admin API v1 subset).

The models mirror the wire format (camelCase) so a Service round-trips unchanged. Fields
Cloud Run does not support are refused by name (``extra="forbid"``) rather than silently
dropped; ``metadata`` keeps unknown keys because clients send server-set ones back.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from cloudlet.domain.errors import InvalidError

API_VERSION = "serving.knative.dev/v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class SecretKeySelector(_Strict):
    name: str
    key: str


class EnvVarSource(_Strict):
    secretKeyRef: SecretKeySelector | None = None


class EnvVar(_Strict):
    name: str
    value: str | None = None
    valueFrom: EnvVarSource | None = None


class ContainerPort(_Strict):
    name: Literal["http1", "h2c"] | None = None
    containerPort: int = Field(default=8080, ge=1, le=65535)
    protocol: Literal["TCP"] | None = None


class ResourceRequirements(_Strict):
    limits: dict[str, str] = Field(default_factory=dict)
    requests: dict[str, str] | None = None


class HTTPHeader(_Strict):
    name: str
    value: str


class HTTPGetAction(_Strict):
    path: str = "/"
    port: int | None = None
    httpHeaders: list[HTTPHeader] | None = None


class TCPSocketAction(_Strict):
    port: int | None = None


class Probe(_Strict):
    httpGet: HTTPGetAction | None = None
    tcpSocket: TCPSocketAction | None = None
    initialDelaySeconds: int | None = Field(default=None, ge=0, le=240)
    timeoutSeconds: int | None = Field(default=None, ge=1, le=240)
    periodSeconds: int | None = Field(default=None, ge=1, le=240)
    failureThreshold: int | None = Field(default=None, ge=1)
    successThreshold: int | None = Field(default=None, ge=1)


class KeyToPath(_Strict):
    """A secret version (``key``) shown as a file (``path``, relative to the mount)."""

    key: str
    path: str
    mode: int | None = Field(default=None, ge=0, le=0o777)


class SecretVolumeSource(_Strict):
    secretName: str
    items: list[KeyToPath] | None = None
    defaultMode: int | None = Field(default=None, ge=0, le=0o777)


class Volume(_Strict):
    """Only secret volumes exist in Cloudlet (rules in ``domain.volumes``)."""

    name: str
    secret: SecretVolumeSource | None = None


class VolumeMount(_Strict):
    name: str
    mountPath: str
    readOnly: bool | None = None


class Container(_Strict):
    name: str | None = None
    image: str = Field(min_length=1)
    command: list[str] | None = None
    args: list[str] | None = None
    env: list[EnvVar] | None = None
    ports: list[ContainerPort] | None = Field(default=None, max_length=1)
    resources: ResourceRequirements | None = None
    workingDir: str | None = None
    startupProbe: Probe | None = None
    livenessProbe: Probe | None = None
    imagePullPolicy: str | None = None
    volumeMounts: list[VolumeMount] | None = None


class RevisionSpec(_Strict):
    containerConcurrency: int | None = Field(default=None, ge=0, le=1000)
    timeoutSeconds: int | None = Field(default=None, ge=1, le=3600)
    serviceAccountName: str | None = None
    containers: list[Container] = Field(min_length=1, max_length=1)
    volumes: list[Volume] | None = None


class TemplateMeta(_Strict):
    name: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    creationTimestamp: Any = None


class RevisionTemplate(_Strict):
    metadata: TemplateMeta = Field(default_factory=TemplateMeta)
    spec: RevisionSpec


class TrafficTarget(_Strict):
    revisionName: str | None = None
    latestRevision: bool | None = None
    percent: int | None = Field(default=None, ge=0, le=100)
    tag: str | None = None
    configurationName: str | None = None
    url: str | None = None


class ServiceSpec(_Strict):
    template: RevisionTemplate
    traffic: list[TrafficTarget] | None = None


class ObjectMeta(_Open):
    name: str = ""
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    uid: str | None = None
    generation: int | None = None
    resourceVersion: str | None = None
    creationTimestamp: str | None = None

    @field_validator("labels", "annotations")
    @classmethod
    def _string_values(cls, value: dict[str, Any] | None) -> dict[str, str] | None:
        return None if value is None else {str(k): str(v) for k, v in value.items()}


class Service(_Strict):
    apiVersion: str = API_VERSION
    kind: Literal["Service"] = "Service"
    metadata: ObjectMeta
    spec: ServiceSpec
    status: dict[str, Any] | None = None


_UNSUPPORTED_HINT = {
    "readinessProbe": "Cloud Run uses startupProbe and livenessProbe only",
    "securityContext": "instances always run with the platform's hardened settings",
    "envFrom": "list variables one by one under env",
    "subPath": "mount the whole secret volume at a directory; name its files with items[].path",
    "ports": "a revision listens on exactly one port",
}
_VOLUME_HINT = (
    "only secret volumes are supported: secret: {secretName, items: [{key: VERSION, "
    "path: FILE}]}, as `--set-secrets /DIR/FILE=SECRET:VERSION` writes"
)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(exc: ValidationError) -> InvalidError:
    first = exc.errors()[0]
    where = _location(first["loc"])
    leaf = str(first["loc"][-1]) if first["loc"] else ""
    if first["type"] == "extra_forbidden":
        hint = _UNSUPPORTED_HINT.get(leaf, "remove it")
        if len(first["loc"]) >= 3 and first["loc"][-3] == "volumes":
            hint = _VOLUME_HINT  # volumes[i].emptyDir, .configMap, .nfs ...
        return InvalidError(f"{where}: field is not supported by Cloudlet ({hint})", field=where)
    if first["type"] == "too_long" and leaf == "ports":
        return InvalidError(
            f"{where}: only one port is supported ({_UNSUPPORTED_HINT['ports']})", field=where
        )
    return InvalidError(f"{where}: {first['msg']}", field=where)


def parse_service(body: Any) -> Service:
    """A Service from a decoded JSON/YAML body, or InvalidError naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidError("body: expected a serving.knative.dev/v1 Service object", field="body")
    if body.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidError(
            f"apiVersion: {body.get('apiVersion')!r} is not supported; use {API_VERSION}",
            field="apiVersion",
        )
    try:
        return Service.model_validate(body)
    except ValidationError as exc:
        raise _explain(exc) from None


def dump(model: BaseModel) -> dict[str, Any]:
    """Wire form: camelCase, without unset/None fields."""
    return model.model_dump(mode="json", exclude_none=True)
