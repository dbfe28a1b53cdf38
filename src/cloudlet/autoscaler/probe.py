"""Probing instances: startup (ready when the probe first succeeds) and liveness (the same
check repeated every period). A probe is a TCP connect or an HTTP GET answered 2xx/3xx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cloudlet.domain.probes import ProbeSettings, failed_too_often
from cloudlet.runtimes.base import ExitState, InstanceInfo, Runtime

Check = Callable[[str, int], Awaitable[bool]]


class InstanceFailed(Exception):
    """The instance exited or never listened; ``reason`` is a Knative-style reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def http_ok(host: str, port: int, path: str, timeout: float) -> bool:
    """GET ``path``; True for a 2xx or 3xx status, as Kubernetes counts success."""
    try:
        return await asyncio.wait_for(_get_status(host, port, path), timeout) in range(200, 400)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        return False


async def _get_status(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: cloudlet-probe\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        line = await reader.readuntil(b"\r\n")
        return int(line.split()[1])
    finally:
        writer.close()


def check_for(settings: ProbeSettings) -> Check:
    """The probe as a function of the instance's address (the port comes from settings)."""
    if settings.action == "http":
        return lambda host, _port: http_ok(host, settings.port, settings.path, settings.timeout)
    return lambda host, _port: tcp_accepts(host, settings.port, min(settings.timeout, 0.5))


def poll_interval(elapsed: float) -> float:
    """Seconds until the next probe, ``elapsed`` seconds into a start: every 5 ms at first,
    then 1/40 of the time waited so far (at most 250 ms). Readiness is then seen within
    2.5% of the app's own start-up time, however long that is, and a slow start on a busy
    machine costs tens of probes rather than hundreds."""
    return min(0.25, max(0.005, elapsed / 40))


def state_check_interval(elapsed: float) -> float:
    """Seconds until the next look at whether the container still runs: every 100 ms at
    first, then a quarter of the time waited so far (at most 1 s). Each look is an Engine
    API call (milliseconds of CPU for the server and for dockerd); when tens of instances
    start at once on a small machine, looking every 100 ms took CPU from the starts."""
    return min(1.0, max(0.1, elapsed / 4))


async def wait_ready(
    runtime: Runtime,
    info: InstanceInfo,
    port: int,
    timeout: float,
    probe: Check = tcp_accepts,
    clock: Callable[[], float] = time.monotonic,
    initial_delay: float = 0.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Return once the probe succeeds; InstanceFailed if the container exits or ``timeout``
    seconds pass. Probes more often than a probe's periodSeconds so cold starts stay short;
    the deadline is the probe's own (initialDelaySeconds + failureThreshold x period)."""
    start = clock()
    if initial_delay:
        await sleep(initial_delay)
    probing_since = next_state_check = clock()
    while True:
        if await probe(info.host, port):
            return
        now = clock()
        if now >= next_state_check:
            state = await runtime.state(info.id)
            if not state.running:
                raise InstanceFailed("ExitCode", await _exit_message(runtime, info, port, state))
            next_state_check = now + state_check_interval(now - probing_since)
        if now - start > timeout:
            raise InstanceFailed(
                "HealthCheckContainerError",
                f"The user-provided container failed to start and listen on the port defined by "
                f"the PORT={port} environment variable within {timeout:.0f}s.",
            )
        await sleep(poll_interval(now - probing_since))


async def startup(runtime: Runtime, info: InstanceInfo, settings: ProbeSettings) -> None:
    """Wait for the revision's startup probe; InstanceFailed names the probe that failed."""
    try:
        await wait_ready(
            runtime,
            info,
            settings.port,
            settings.deadline,
            check_for(settings),
            initial_delay=settings.initial_delay,
        )
    except InstanceFailed as error:
        if error.reason == "HealthCheckContainerError" and settings.action == "http":
            error.message = (
                f"The user-provided container did not answer the startup probe "
                f"GET {settings.path} on port {settings.port} with 2xx/3xx within "
                f"{settings.deadline:.0f}s (initialDelaySeconds + failureThreshold x "
                "periodSeconds)."
            )
        raise


async def until_unhealthy(
    info: InstanceInfo,
    settings: ProbeSettings,
    check: Check | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Probe every period from initialDelaySeconds on; return once the probe has failed
    failureThreshold times in a row (the count, for the message)."""
    check = check or check_for(settings)
    await sleep(settings.initial_delay)
    failures = 0
    while not failed_too_often(failures, settings):
        await sleep(settings.period)
        failures = 0 if await check(info.host, settings.port) else failures + 1
    return failures


async def _exit_message(runtime: Runtime, info: InstanceInfo, port: int, state: ExitState) -> str:
    logs = (await runtime.logs_tail(info.id, 10)).strip()
    why = "was killed: out of memory" if state.oom_killed else f"exited with code {state.exit_code}"
    text = (
        f"The user-provided container {why} before listening on the port defined by the "
        f"PORT={port} environment variable."
    )
    if state.error:
        text += f" Engine: {state.error}."
    return text + (f" Last log lines:\n{logs}" if logs else "")
