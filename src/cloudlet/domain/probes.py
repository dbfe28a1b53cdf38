"""Startup and liveness probes: gcloud's ``--startup-probe`` / ``--liveness-probe`` syntax,
the Knative probe it becomes, and the runtime settings (with Cloud Run's defaults) the
autoscaler follows. Purely computational; no I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.models import Probe

ProbeKind = Literal["startup", "liveness"]

_COMMON_KEYS = (
    "initialDelaySeconds",
    "timeoutSeconds",
    "periodSeconds",
    "failureThreshold",
    "httpGet.port",
    "httpGet.path",
)
SUPPORTED_KEYS: dict[str, tuple[str, ...]] = {
    "startup": (*_COMMON_KEYS, "tcpSocket.port"),
    "liveness": _COMMON_KEYS,
}
"""gcloud's keys per probe type (its gRPC keys aside: Cloudlet has no gRPC probes)."""
_INT_FIELDS = ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "failureThreshold")

DEFAULT_STARTUP_TIMEOUT = 240
"""Seconds an instance may take to listen when the revision names no startup probe."""
DEFAULT_PERIOD = 10
DEFAULT_TIMEOUT = 1
DEFAULT_FAILURE_THRESHOLD = 3


def parse_probe_flag(text: str, kind: ProbeKind) -> dict[str, Any] | None:
    """``--KIND-probe=KEY=VALUE,...`` as a Knative probe body; ``""`` (remove it) is None."""
    flag = f"--{kind}-probe"
    if not text.strip():
        return None
    probe: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise InvalidError(f"{flag}: {item!r} is not KEY=VALUE", field=flag)
        if key not in SUPPORTED_KEYS[kind]:
            raise InvalidError(
                f"{flag}: key [{key}] not recognized for {kind} probe; use one of "
                + ", ".join(SUPPORTED_KEYS[kind]),
                field=flag,
            )
        _set(probe, key, value.strip(), flag)
    if "httpGet" in probe and "tcpSocket" in probe:
        raise InvalidError(f"{flag}: give httpGet.* or tcpSocket.*, not both", field=flag)
    return probe


def _set(probe: dict[str, Any], key: str, value: str, flag: str) -> None:
    action, _, field = key.partition(".")
    if not field:
        probe[key] = _int(value, key, flag)
        return
    target = probe.setdefault(action, {})
    target[field] = value if field == "path" else _int(value, key, flag)


def _int(value: str, key: str, flag: str) -> int:
    if not value.isdigit():
        raise InvalidError(
            f"{flag}: value for key [{key}] must be a whole number, got {value!r}", field=flag
        )
    return int(value)


@dataclass(frozen=True)
class ProbeSettings:
    """How the autoscaler checks an instance: a TCP connect or an HTTP GET (2xx/3xx)."""

    action: Literal["tcp", "http"]
    port: int
    path: str = "/"
    initial_delay: float = 0.0
    timeout: float = DEFAULT_TIMEOUT
    period: float = DEFAULT_PERIOD
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD

    @property
    def deadline(self) -> float:
        """Seconds after the start by which a startup probe must have succeeded."""
        return self.initial_delay + self.failure_threshold * self.period


def default_startup_probe(port: int) -> ProbeSettings:
    """Cloud Run's default: a TCP connect to PORT, for up to 240 s."""
    return ProbeSettings(
        "tcp",
        port,
        timeout=DEFAULT_STARTUP_TIMEOUT,
        period=DEFAULT_STARTUP_TIMEOUT,
        failure_threshold=1,
    )


def probe_settings(probe: Probe | None, port: int) -> ProbeSettings | None:
    """The settings of a Knative probe (None for none); ports default to the container's."""
    if probe is None:
        return None
    common: dict[str, Any] = {
        "initial_delay": float(probe.initialDelaySeconds or 0),
        "timeout": float(probe.timeoutSeconds or DEFAULT_TIMEOUT),
        "period": float(probe.periodSeconds or DEFAULT_PERIOD),
        "failure_threshold": probe.failureThreshold or DEFAULT_FAILURE_THRESHOLD,
    }
    if probe.httpGet is not None:
        return ProbeSettings("http", probe.httpGet.port or port, probe.httpGet.path, **common)
    tcp_port = probe.tcpSocket.port if probe.tcpSocket is not None else None
    return ProbeSettings("tcp", tcp_port or port, **common)


def failed_too_often(failures_in_a_row: int, settings: ProbeSettings) -> bool:
    """A liveness probe has failed ``failureThreshold`` times in a row: replace the instance."""
    return failures_in_a_row >= settings.failure_threshold
