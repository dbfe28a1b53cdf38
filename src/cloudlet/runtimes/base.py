"""The runtime seam: what the autoscaler needs from a container engine."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple, Protocol

from cloudlet.domain.errors import CloudletError


class RuntimeFailure(CloudletError):
    """The engine refused or failed an operation."""

    status = 503
    reason = "RuntimeFailure"


class ImageNotFound(RuntimeFailure):
    """The image is not in the engine's store (and cannot be pulled)."""

    status = 400
    reason = "ImageNotFound"
    user_fault = True


class CommandNotRunnable(RuntimeFailure):
    """The container's command (its entrypoint and args) could not be executed."""

    status = 400
    reason = "ContainerCommandFailed"
    user_fault = True


class EngineUnavailable(RuntimeFailure):
    """The engine's socket does not answer."""


@dataclass(frozen=True)
class SecretFile:
    """A file the instance sees read-only at ``mount_path``/``path`` (a secret version)."""

    mount_path: str
    path: str
    content: bytes = field(repr=False)
    mode: int = 0o444


@dataclass(frozen=True)
class InstanceSpec:
    """Everything needed to start one instance of a revision."""

    service: str
    revision: str
    configuration: str
    image: str
    port: int = 8080
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cpu_millis: int = 1000
    memory_bytes: int = 512 * 2**20
    cpu_boost: bool = False
    labels: tuple[tuple[str, str], ...] = ()
    files: tuple[SecretFile, ...] = ()
    """Secret files, grouped by ``mount_path`` into read-only mounts (filled at start)."""


@dataclass(frozen=True)
class InstanceInfo:
    """A running (or just started) container as the engine reports it."""

    id: str
    service: str
    revision: str
    host: str
    port: int
    running: bool = True
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitState:
    """Why a container is no longer running (``running`` True if it still is)."""

    running: bool
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""


class InstanceEvent(NamedTuple):
    """An instance's container died (``die``, with its exit code), or a process in it was
    killed for exceeding the memory limit (``oom``, no exit code; the container may live on
    if the victim was not its main process)."""

    instance_id: str
    action: str
    exit_code: int | None


class LogLine(NamedTuple):
    """One line an instance wrote, without its newline, stamped by the engine."""

    stream: Literal["stdout", "stderr"]
    line: str
    timestamp: datetime


class Runtime(Protocol):
    """One container engine. Every method is safe to call concurrently."""

    async def ensure_image(self, image: str) -> str:
        """The image's immutable id (digest); ImageNotFound if it is not available."""
        ...

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        """Create and start a container; returns once it runs and has an address."""
        ...

    async def state(self, instance_id: str) -> ExitState: ...

    async def logs_tail(self, instance_id: str, lines: int = 20) -> str: ...

    async def stop(self, instance_id: str, grace_seconds: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after the grace period; then remove the container."""
        ...

    async def throttle(self, instance_id: str) -> None:
        """Cut the instance's CPU to nearly nothing (idle instance)."""
        ...

    async def unthrottle(self, instance_id: str, cpu_millis: int) -> None: ...

    def throttle_now(self, instance_id: str) -> bool:
        """Throttle without awaiting (for the data plane's hot path); False if this runtime
        cannot do it synchronously and the caller must await ``throttle`` instead."""
        ...

    def unthrottle_now(self, instance_id: str, cpu_millis: int) -> bool:
        """Unthrottle without awaiting; False means: await ``unthrottle`` instead."""
        ...

    async def list_instances(self) -> list[InstanceInfo]:
        """Running containers this server owns, for adoption after a restart."""
        ...

    def events(self, since: float | None = None) -> AsyncGenerator[InstanceEvent, None]:
        """Deaths of this server's instances as they happen (from ``since``, a Unix time,
        if given, so a caller can subscribe without missing an early crash)."""
        ...

    def stream_logs(self, instance_id: str) -> AsyncGenerator[LogLine, None]:
        """Everything the instance writes, from its start, until its container stops."""
        ...

    async def close(self) -> None: ...
