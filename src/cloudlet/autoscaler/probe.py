"""Readiness: an instance is ready when its port accepts a TCP connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from cloudlet.runtimes.base import ExitState, InstanceInfo, Runtime


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


def poll_interval(elapsed: float) -> float:
    """Probe often while a fast start is likely, then back off."""
    if elapsed < 2.0:
        return 0.005
    if elapsed < 10.0:
        return 0.05
    return 0.25


async def wait_ready(
    runtime: Runtime,
    info: InstanceInfo,
    port: int,
    timeout: float,
    probe: Callable[[str, int], Awaitable[bool]] = tcp_accepts,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once ``port`` accepts; InstanceFailed if the container exits or time runs out."""
    start = clock()
    next_state_check = start
    while True:
        if await probe(info.host, port):
            return
        now = clock()
        if now >= next_state_check:
            state = await runtime.state(info.id)
            if not state.running:
                raise InstanceFailed("ExitCode", await _exit_message(runtime, info, port, state))
            next_state_check = now + 0.1
        if now - start > timeout:
            raise InstanceFailed(
                "HealthCheckContainerError",
                f"The user-provided container failed to start and listen on the port defined by "
                f"the PORT={port} environment variable within {timeout:.0f}s.",
            )
        await asyncio.sleep(poll_interval(now - start))


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
