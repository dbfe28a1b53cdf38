"""The fake runtime behaves as the autoscaler's tests need: recorded calls, chosen addresses,
deaths on demand, reported as events."""

from __future__ import annotations

import asyncio

import pytest

from cloudlet.runtimes.base import (
    ExitState,
    ImageNotFound,
    InstanceEvent,
    InstanceSpec,
    Runtime,
    RuntimeFailure,
)
from cloudlet.runtimes.fake import FakeRuntime

SPEC = InstanceSpec(
    service="hello", revision="hello-00001-abc", configuration="hello", image="hello:latest"
)


def test_fake_runtime_satisfies_the_runtime_protocol() -> None:
    runtime: Runtime = FakeRuntime()
    assert runtime is not None


async def test_start_returns_the_chosen_address_and_records_the_call() -> None:
    runtime = FakeRuntime(("10.0.0.7", 9000))
    info = await runtime.start(SPEC)
    assert (info.host, info.port, info.revision, info.running) == (
        "10.0.0.7",
        9000,
        SPEC.revision,
        True,
    )
    assert runtime.calls == [("start", SPEC.revision)]
    assert await runtime.list_instances() == [info]


async def test_address_factory_gives_each_instance_its_own_port() -> None:
    runtime = FakeRuntime(address_factory=lambda spec, n: ("127.0.0.1", 9000 + n))
    first, second = await runtime.start(SPEC), await runtime.start(SPEC)
    assert (first.port, second.port) == (9001, 9002)
    assert first.id != second.id


async def test_missing_image_raises_image_not_found() -> None:
    runtime = FakeRuntime(missing_images={"gone:latest"})
    with pytest.raises(ImageNotFound):
        await runtime.ensure_image("gone:latest")
    assert (await runtime.ensure_image("hello:latest")).startswith("sha256:")


async def test_an_injected_start_failure_fails_one_start_only() -> None:
    runtime = FakeRuntime()
    runtime.fail_next_start = RuntimeFailure("engine on fire")
    with pytest.raises(RuntimeFailure, match="on fire"):
        await runtime.start(SPEC)
    assert (await runtime.start(SPEC)).running


async def test_exit_shows_in_state_and_reaches_event_subscribers() -> None:
    runtime = FakeRuntime()
    info = await runtime.start(SPEC)
    runtime.write(info.id, "Traceback: boom", "stderr")
    runtime.exit(info.id, 3)
    assert await runtime.state(info.id) == ExitState(running=False, exit_code=3)
    assert await runtime.logs_tail(info.id) == "Traceback: boom\n"
    assert await runtime.list_instances() == []
    events = runtime.events(since=0.0)
    assert await anext(events) == InstanceEvent(info.id, "die", 3)
    await events.aclose()


async def test_throttle_and_unthrottle_set_the_quota() -> None:
    runtime = FakeRuntime()
    info = await runtime.start(SPEC)
    assert runtime.throttle_now(info.id)
    assert runtime.instances[info.id].throttled
    await runtime.unthrottle(info.id, 2000)
    assert runtime.instances[info.id].cpu_quota_us == 200_000
    with pytest.raises(RuntimeFailure):
        await runtime.throttle("fake-unknown")


async def test_stop_records_the_grace_and_is_idempotent() -> None:
    runtime = FakeRuntime()
    info = await runtime.start(SPEC)
    instance = runtime.instances[info.id]
    await runtime.stop(info.id, grace_seconds=2.5)
    await runtime.stop(info.id)
    assert instance.stopped_with_grace == 2.5
    assert not (await runtime.state(info.id)).running


async def test_start_gate_holds_a_cold_start_until_released() -> None:
    runtime = FakeRuntime()
    runtime.start_gate = asyncio.Event()
    starting = asyncio.create_task(runtime.start(SPEC))
    await asyncio.sleep(0)
    assert not starting.done() and runtime.calls == [("start", SPEC.revision)]
    runtime.start_gate.set()
    assert (await starting).running


async def test_stream_logs_follows_until_the_instance_exits() -> None:
    runtime = FakeRuntime()
    info = await runtime.start(SPEC)
    runtime.write(info.id, "one")
    lines = runtime.stream_logs(info.id)
    assert (await anext(lines)).line == "one"
    pending = asyncio.ensure_future(anext(lines))
    await asyncio.sleep(0)
    runtime.write(info.id, "two", "stderr")
    assert (await pending)[:2] == ("stderr", "two")
    runtime.exit(info.id, 0)
    assert [line async for line in lines] == []
