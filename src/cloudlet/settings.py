"""Server settings: read and validated once at start-up into one typed object.

Each field can be set by a ``cloudlet server`` flag or a ``CLOUDLET_<NAME>`` environment
variable (flags win). Nothing else in Cloudlet reads the environment.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from cloudlet.domain.errors import InvalidError
from cloudlet.domain.quantities import parse_duration, parse_memory


def default_home(env: Mapping[str, str]) -> Path:
    """CLOUDLET_HOME, else $XDG_DATA_HOME/cloudlet, else ~/.local/share/cloudlet."""
    if env.get("CLOUDLET_HOME"):
        return Path(env["CLOUDLET_HOME"]).expanduser()
    data = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "cloudlet"


@dataclass(frozen=True)
class Settings:
    """Everything ``cloudlet server`` needs to know."""

    home: Path = field(default_factory=lambda: default_home(os.environ))
    """State directory: the SQLite database, the API token, server.json."""
    host: str = "127.0.0.1"
    """Address the router binds (service traffic)."""
    port: int = 8080
    """Router port; service URLs are http://SERVICE.DOMAIN:PORT."""
    api_host: str = "127.0.0.1"
    """Address of the control API; loopback unless you mean otherwise."""
    api_port: int = 8090
    """Control API port."""
    api_tls_host: str = "127.0.0.1"
    """Address of the control API's HTTPS listener (kubectl, gcloud --platform kubernetes)."""
    api_tls_port: int | None = None
    """Port of the control API's HTTPS listener; None = no listener. gcloud needs 443."""
    domain: str = "localhost"
    """Domain of service URLs."""
    scale_to_zero_grace: float = 30.0
    """Seconds past the stable window with no traffic before an idle revision scales to zero."""
    stable_window: float = 60.0
    """Seconds of traffic averaged by the autoscaler (Knative's stable window)."""
    docker_socket: str = "/var/run/docker.sock"
    """Docker Engine API socket."""
    network: str = "cloudlet"
    """User-defined bridge network the instances join."""
    shutdown_grace: float = 10.0
    """Seconds between SIGTERM and SIGKILL when an instance stops."""
    log_retention_bytes: int = 256 * 2**20
    """Size cap of the log store (logs.db); the oldest entries are dropped first."""

    @property
    def owner(self) -> str:
        """Label value marking the containers this server (this home) owns."""
        return hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]

    @property
    def database(self) -> Path:
        return self.home / "cloudlet.db"

    @property
    def logs_database(self) -> Path:
        return self.home / "logs.db"


_DURATIONS = {"scale_to_zero_grace", "stable_window", "shutdown_grace"}
_INTS = {"port", "api_port", "api_tls_port"}


def _convert(name: str, value: Any) -> Any:
    flag = "--" + name.replace("_", "-")
    if name in _DURATIONS:
        return float(parse_duration(str(value), flag))
    if name in _INTS:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InvalidError(f"{flag}: {value!r} is not a port number", field=flag) from None
        if not 0 <= number <= 65535:
            raise InvalidError(f"{flag}: {number} is not a port number (0-65535)", field=flag)
        return number
    if name == "log_retention_bytes":
        return _log_cap(str(value), flag)
    if name == "home":
        return Path(str(value)).expanduser()
    return str(value)


def _log_cap(value: str, flag: str) -> int:
    number = parse_memory(value, flag)
    if number < 2**20:
        raise InvalidError(f"{flag}: {value!r} is too small; give at least 1Mi", field=flag)
    return number


def load(env: Mapping[str, str], **flags: Any) -> Settings:
    """Defaults, overridden by CLOUDLET_* variables, overridden by flags that were given."""
    values: dict[str, Any] = {"home": default_home(env)}
    for item in fields(Settings):
        raw = env.get(f"CLOUDLET_{item.name.upper()}")
        if raw is not None and item.name != "home":
            values[item.name] = _convert(item.name, raw)
    for name, value in flags.items():
        if value is not None:
            values[name] = _convert(name, value)
    return replace(Settings(), **values)
