"""The Docker runtime: each instance is one container on a user-defined bridge network.

Containers publish no ports; only the router reaches them, by their IP on the network. They
carry ``cloudlet.*`` labels naming their owner (one Cloudlet server), service, revision and
port, which is how a restarted server finds and adopts them. Limits follow Cloud Run's
contract: CPU as a CFS quota, memory without swap, a pids cap, an in-memory ``/tmp``, fewer
capabilities, no privilege escalation.

Throttling an idle instance writes its cgroup v1 ``cpu.cfs_quota_us`` directly (a few
microseconds, and callable without awaiting from the data plane's hot path); the Engine
API's update (milliseconds) is the fallback where that file is not to be found.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import string
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

from cloudlet.runtimes.base import (
    ExitState,
    ImageNotFound,
    InstanceEvent,
    InstanceInfo,
    InstanceSpec,
    LogLine,
    RuntimeFailure,
)
from cloudlet.runtimes.engine import JSON, DockerEngine, EngineConflict, NoSuchObject
from cloudlet.runtimes.secretfiles import SecretDirs

CPU_PERIOD_US: Final = 100_000
# 1% of one CPU: the kernel's smallest quota. Enough to answer a probe, slowly.
THROTTLED_QUOTA_US: Final = 1_000
PIDS_LIMIT: Final = 2048
DROPPED_CAPABILITIES: Final = ("NET_RAW", "MKNOD", "AUDIT_WRITE")
DEFAULT_PORT: Final = 8080

MANAGED_LABEL: Final = "cloudlet.managed"
OWNER_LABEL: Final = "cloudlet.owner"
SERVICE_LABEL: Final = "cloudlet.service"
REVISION_LABEL: Final = "cloudlet.revision"
CONFIGURATION_LABEL: Final = "cloudlet.configuration"
PORT_LABEL: Final = "cloudlet.port"

# Where a container's CPU quota lives under cgroup v1: cgroupfs driver, then systemd driver.
_QUOTA_FILES: Final = (
    "{root}/cpu/docker/{id}/cpu.cfs_quota_us",
    "{root}/cpu/system.slice/docker-{id}.scope/cpu.cfs_quota_us",
)
_NAME_ALPHABET: Final = string.ascii_lowercase + string.digits


class DockerRuntime:
    """Runs instances as containers of the local Docker engine (the ``Runtime`` protocol)."""

    def __init__(
        self,
        owner: str,
        network: str = "cloudlet",
        socket_path: str = "/var/run/docker.sock",
        cgroup_root: str = "/sys/fs/cgroup",
    ) -> None:
        self.owner = owner
        self.network = network
        self._engine = DockerEngine(socket_path)
        self._secret_dirs = SecretDirs(owner)  # secret files, bind-mounted read-only
        self._cgroups = CpuQuotaFiles(cgroup_root)
        # The quota each instance runs with when not throttled, to restore before shutdown.
        self._quotas: dict[str, int] = {}
        self._network_ready = False
        self._network_lock = asyncio.Lock()

    @property
    def engine(self) -> DockerEngine:
        """The Engine API client, shared with the builder."""
        return self._engine

    async def close(self) -> None:
        await self._engine.close()
        self._secret_dirs.close()

    async def ensure_image(self, image: str) -> str:
        name = normalize_image(image)
        try:
            info = await self._engine.image_inspect(name)
        except ImageNotFound as exc:
            raise ImageNotFound(missing_image_message(name), field="image") from exc
        return str(info["Id"])

    async def start(self, spec: InstanceSpec) -> InstanceInfo:
        await self._ensure_network()
        name = container_name(spec.revision, _random_suffix())
        config = make_container_config(spec, self.owner, self.network)
        try:
            if spec.files:
                config["HostConfig"]["Mounts"] = self._secret_dirs.write(name, spec.files)
            container_id = await self._create(name, config)
            await self._engine.container_start(container_id)
            info = await self._engine.container_inspect(container_id)
        except BaseException:
            # Also on cancellation: a created but unstarted container must not linger. By
            # name, because create may have succeeded without us learning the id.
            await self._discard(name)
            self._secret_dirs.remove(name)
            raise
        self._secret_dirs.track(container_id, name)
        self._quotas[container_id] = cpu_quota_us(spec.cpu_millis, boost=spec.cpu_boost)
        return self._instance_info(container_id, info["Config"]["Labels"], info)

    async def state(self, instance_id: str) -> ExitState:
        try:
            info = await self._engine.container_inspect(instance_id)
        except NoSuchObject:
            return ExitState(running=False, error=f"container {instance_id} no longer exists")
        return exit_state(info["State"])

    async def logs_tail(self, instance_id: str, lines: int = 20) -> str:
        try:
            entries = await self._engine.container_logs(instance_id, lines)
        except NoSuchObject:
            return ""
        return b"".join(payload for _, payload in entries).decode("utf-8", errors="replace")

    async def stop(self, instance_id: str, grace_seconds: float = 10.0) -> None:
        try:
            # A throttled instance could not run its SIGTERM handler within the grace period.
            await self._restore_cpu(instance_id)
            await self._engine.container_stop(instance_id, math.ceil(grace_seconds))
        except NoSuchObject:
            pass  # already gone: stopping is idempotent
        await self._remove(instance_id)
        self._secret_dirs.release(instance_id)
        self._quotas.pop(instance_id, None)
        self._cgroups.forget(instance_id)

    async def throttle(self, instance_id: str) -> None:
        if not self.throttle_now(instance_id):
            await self._update_quota(instance_id, THROTTLED_QUOTA_US)

    async def unthrottle(self, instance_id: str, cpu_millis: int) -> None:
        if not self.unthrottle_now(instance_id, cpu_millis):
            await self._update_quota(instance_id, cpu_quota_us(cpu_millis, boost=False))

    def throttle_now(self, instance_id: str) -> bool:
        return self._cgroups.write(instance_id, THROTTLED_QUOTA_US)

    def unthrottle_now(self, instance_id: str, cpu_millis: int) -> bool:
        quota = cpu_quota_us(cpu_millis, boost=False)
        self._quotas[instance_id] = quota
        return self._cgroups.write(instance_id, quota)

    async def list_instances(self) -> list[InstanceInfo]:
        containers = await self._engine.container_list([f"{OWNER_LABEL}={self.owner}"])
        self._secret_dirs.adopt({c["Id"]: (c.get("Names") or [""])[0][1:] for c in containers})
        return [self._instance_info(c["Id"], c.get("Labels") or {}, c) for c in containers]

    async def events(self, since: float | None = None) -> AsyncGenerator[InstanceEvent, None]:
        filters = {
            "type": ["container"],
            "event": ["die", "oom"],
            "label": [f"{OWNER_LABEL}={self.owner}"],
        }
        async with contextlib.aclosing(self._engine.events(filters, since)) as messages:
            async for message in messages:
                yield instance_event(message)

    async def stream_logs(self, instance_id: str) -> AsyncGenerator[LogLine, None]:
        async with contextlib.aclosing(self._engine.container_log_lines(instance_id)) as lines:
            async for line in lines:
                yield line

    # -- helpers --------------------------------------------------------------------------

    async def _ensure_network(self) -> None:
        # The lock matters: the engine's CheckDuplicate is not atomic, and concurrent creates
        # make several networks of one name, which the engine then refuses as ambiguous.
        if self._network_ready:
            return
        async with self._network_lock:
            if self._network_ready:
                return
            if await self._engine.network_inspect(self.network) is None:
                # Another server may create it first: its conflict is as good as success.
                with contextlib.suppress(EngineConflict):
                    await self._engine.network_create(self.network, {MANAGED_LABEL: "true"})
            self._network_ready = True

    async def _create(self, name: str, config: JSON) -> str:
        try:
            return await self._engine.container_create(name, config)
        except ImageNotFound as exc:
            image = str(config["Image"])
            raise ImageNotFound(missing_image_message(image), field="image") from exc
        except NoSuchObject:
            self._network_ready = False  # the network was removed under us: recreate next time
            raise

    async def _discard(self, name: str) -> None:
        """Best-effort cleanup that must not hide the error that made it necessary."""
        with contextlib.suppress(RuntimeFailure):
            await self._remove(name)

    async def _remove(self, name_or_id: str) -> None:
        # Never created, already removed, or a removal already in progress: all fine.
        with contextlib.suppress(NoSuchObject, EngineConflict):
            await self._engine.container_remove(name_or_id)

    async def _restore_cpu(self, instance_id: str) -> None:
        quota = self._quotas.get(instance_id) or await self._configured_quota(instance_id)
        if quota and not self._cgroups.write(instance_id, quota):
            await self._update_quota(instance_id, quota)

    async def _configured_quota(self, instance_id: str) -> int:
        """The quota the container was created with (instances adopted after a restart)."""
        info = await self._engine.container_inspect(instance_id)
        return int(info["HostConfig"].get("CpuQuota") or 0)

    async def _update_quota(self, instance_id: str, quota: int) -> None:
        await self._engine.container_update(
            instance_id, {"CpuPeriod": CPU_PERIOD_US, "CpuQuota": quota}
        )

    def _instance_info(
        self, container_id: str, labels: Mapping[str, str], info: JSON
    ) -> InstanceInfo:
        """From an inspect or a list entry: both carry NetworkSettings.Networks."""
        networks: Mapping[str, Any] = info.get("NetworkSettings", {}).get("Networks") or {}
        endpoint: Mapping[str, Any] = networks.get(self.network) or {}
        return InstanceInfo(
            id=container_id,
            service=labels.get(SERVICE_LABEL, ""),
            revision=labels.get(REVISION_LABEL, ""),
            host=str(endpoint.get("IPAddress") or ""),
            port=_port(labels),
            running=_is_running(info),
            labels=dict(labels),
        )


class CpuQuotaFiles:
    """Writes containers' cgroup v1 ``cpu.cfs_quota_us`` files, remembering where they are."""

    def __init__(self, cgroup_root: str) -> None:
        self._root = cgroup_root
        self._paths: dict[str, str] = {}

    def write(self, container_id: str, quota_us: int) -> bool:
        """True if the kernel took the quota; False if the file is missing or refused it."""
        path = self._paths.get(container_id) or self._find(container_id)
        if path is None:
            return False
        try:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(quota_us).encode())
            finally:
                os.close(fd)
        except OSError:
            self.forget(container_id)  # the container is gone: its cgroup went with it
            return False
        self._paths[container_id] = path
        return True

    def forget(self, container_id: str) -> None:
        self._paths.pop(container_id, None)

    def _find(self, container_id: str) -> str | None:
        for template in _QUOTA_FILES:
            path = template.format(root=self._root, id=container_id)
            if os.path.exists(path):
                return path
        return None


def make_container_config(spec: InstanceSpec, owner: str, network: str) -> JSON:
    """The Engine API's container-create body for one instance of a revision."""
    config: JSON = {
        "Image": normalize_image(spec.image),
        "Env": [f"{name}={value}" for name, value in instance_env(spec).items()],
        "Labels": instance_labels(spec, owner),
        # Not attached, not open: the container's stdin is at EOF, as on Cloud Run.
        "AttachStdin": False,
        "OpenStdin": False,
        "Tty": False,
        # Cloud Run always sends SIGTERM, whatever STOPSIGNAL the image declares.
        "StopSignal": "SIGTERM",
        "HostConfig": host_config(spec, network),
    }
    # Empty means "the image's own": Docker falls back only when the key is absent.
    if spec.command:
        config["Entrypoint"] = list(spec.command)
    if spec.args:
        config["Cmd"] = list(spec.args)
    return config


def host_config(spec: InstanceSpec, network: str) -> JSON:
    return {
        "NetworkMode": network,
        # CpuQuota, not NanoCpus: the engine refuses a later CpuQuota update on a container
        # created with NanoCpus, and throttling is such an update.
        "CpuPeriod": CPU_PERIOD_US,
        "CpuQuota": cpu_quota_us(spec.cpu_millis, boost=spec.cpu_boost),
        "Memory": spec.memory_bytes,
        "MemorySwap": spec.memory_bytes,  # equal to Memory: no swap
        "PidsLimit": PIDS_LIMIT,
        "CapDrop": list(DROPPED_CAPABILITIES),
        "SecurityOpt": ["no-new-privileges"],
        "Tmpfs": {"/tmp": "rw,nosuid,nodev,mode=1777"},
        "Privileged": False,
        "PortBindings": {},
        "PublishAllPorts": False,
        "RestartPolicy": {"Name": "no"},
        "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m"}},
    }


def instance_env(spec: InstanceSpec) -> dict[str, str]:
    """The revision's env, then the contract's variables, which the user cannot override."""
    env = dict(spec.env)
    env.update(
        PORT=str(spec.port),
        K_SERVICE=spec.service,
        K_REVISION=spec.revision,
        K_CONFIGURATION=spec.configuration,
    )
    return env


def instance_labels(spec: InstanceSpec, owner: str) -> dict[str, str]:
    """The spec's labels, then Cloudlet's own, which must not be spoofed by them."""
    labels = dict(spec.labels)
    labels.update(
        {
            MANAGED_LABEL: "true",
            OWNER_LABEL: owner,
            SERVICE_LABEL: spec.service,
            REVISION_LABEL: spec.revision,
            CONFIGURATION_LABEL: spec.configuration,
            PORT_LABEL: str(spec.port),
        }
    )
    return labels


def cpu_quota_us(cpu_millis: int, *, boost: bool) -> int:
    """CFS quota per 100 ms period; startup boost doubles it; never below the kernel's 1 ms."""
    return max(THROTTLED_QUOTA_US, cpu_millis * 100 * (2 if boost else 1))


def container_name(revision: str, suffix: str) -> str:
    return f"cloudlet-{revision}-{suffix}"


def normalize_image(image: str) -> str:
    """``eu.gcr.io/proj/app`` → ``eu.gcr.io/proj/app:latest``; tags, digests and ids stay."""
    if image.startswith("sha256:") or "@" in image:
        return image
    last_part = image.rsplit("/", 1)[-1]  # a registry's ``host:port`` is not a tag
    return image if ":" in last_part else f"{image}:latest"


def missing_image_message(image: str) -> str:
    return (
        f"image {image} is not in the local Docker engine: build it with "
        f"`cloudlet builds submit --tag {image}` or `docker build -t {image} .`"
    )


def exit_state(state: Mapping[str, Any]) -> ExitState:
    """From an inspect's ``State``."""
    running = bool(state.get("Running"))
    return ExitState(
        running=running,
        exit_code=None if running else int(state.get("ExitCode") or 0),
        oom_killed=bool(state.get("OOMKilled")),
        error=str(state.get("Error") or ""),
    )


def instance_event(message: Mapping[str, Any]) -> InstanceEvent:
    """From an engine event; ``die`` carries ``exitCode`` among the actor's attributes."""
    actor: Mapping[str, Any] = message.get("Actor") or {}
    attributes: Mapping[str, Any] = actor.get("Attributes") or {}
    code = attributes.get("exitCode")
    return InstanceEvent(
        instance_id=str(actor.get("ID") or message.get("id") or ""),
        action=str(message.get("Action") or message.get("status") or ""),
        exit_code=int(code) if code is not None else None,
    )


def _is_running(info: Mapping[str, Any]) -> bool:
    # An inspect has State as an object; a list entry has it as a word.
    state = info.get("State")
    return bool(state.get("Running")) if isinstance(state, Mapping) else state == "running"


def _port(labels: Mapping[str, str]) -> int:
    try:
        return int(labels.get(PORT_LABEL, DEFAULT_PORT))
    except ValueError:
        return DEFAULT_PORT


def _random_suffix() -> str:
    return "".join(secrets.choice(_NAME_ALPHABET) for _ in range(6))
