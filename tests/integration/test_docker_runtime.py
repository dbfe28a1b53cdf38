"""The Docker runtime against the real dockerd: what an instance's container sees (address,
env, labels, limits, tmpfs, no published ports), how it dies and is stopped, throttling,
adoption by owner, and the event and log streams.

Runs on a tiny image made from the host's static busybox (no registry needed), on a network
and under owner labels unique to this run; every container is removed, even on failure.
Skips when dockerd is absent, unless ``CI`` is set: then it fails.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from cloudlet.runtimes.base import (
    EngineUnavailable,
    ImageNotFound,
    InstanceEvent,
    InstanceInfo,
    InstanceSpec,
    LogLine,
    RuntimeFailure,
)
from cloudlet.runtimes.docker import DockerRuntime
from cloudlet.runtimes.engine import NoSuchObject

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

IMAGE = "cloudlet-test-busybox:latest"
RUN = uuid.uuid4().hex[:8]
OWNER = f"test-{RUN}"
OTHER_OWNER = f"test-{RUN}-other"
NETWORK = f"cloudlet-test-{RUN}"
FRESH_NETWORK = f"cloudlet-test-{RUN}-fresh"
BUILT_IMAGE = f"cloudlet-test-build-{RUN}:latest"
SOCKET = "/var/run/docker.sock"
CGROUP = Path("/sys/fs/cgroup")
MiB = 2**20

# Writes what the container sees into files httpd then serves, so the test can read them.
PROBE_SCRIPT = """
env > /www/env.txt
grep ' /tmp ' /proc/mounts > /www/mounts.txt
stat -c %a /tmp > /www/tmpmode.txt
grep -E 'CapEff|NoNewPrivs' /proc/self/status > /www/status.txt
read line; echo $? > /www/stdin.txt
exec httpd -f -p "$PORT" -h /www
"""
# PID 1 with a TERM trap: exits 42 on SIGTERM (a SIGKILL would give 137).
TERM_TRAP_SCRIPT = 'trap "exit 42" TERM; sleep 1000 & wait'

Starter = Callable[..., Awaitable[InstanceInfo]]


# -- fixtures -------------------------------------------------------------------------------


def _docker_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["docker", *args], input=stdin, capture_output=True, timeout=120)


def _dockerd_reachable() -> bool:
    return (
        shutil.which("docker") is not None
        and os.path.exists(SOCKET)
        and _docker_cli("version").returncode == 0
    )


def _build_busybox_image() -> None:
    """A scratch image: the host's static busybox, an applet symlink each, /www, /tmp."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "www").mkdir()
        (root / "tmp").mkdir(mode=0o1777)
        (root / "tmp").chmod(0o1777)
        shutil.copy(busybox, root / "bin" / "busybox")
        applets = subprocess.run([busybox, "--list"], capture_output=True, text=True).stdout
        for applet in applets.split():
            if applet != "busybox":
                (root / "bin" / applet).symlink_to("busybox")
        (root / "www" / "index.html").write_text("hello from the cloudlet test image\n")
        archive = subprocess.run(["tar", "-C", tmp, "-c", "."], capture_output=True, check=True)
        default_cmd = 'CMD ["sh", "-c", "exec httpd -f -p $PORT -h /www"]'
        imported = _docker_cli("import", "--change", default_cmd, "-", IMAGE, stdin=archive.stdout)
        assert imported.returncode == 0, imported.stderr.decode()


def _remove_everything_of_this_run() -> None:
    for owner in (OWNER, OTHER_OWNER):
        listed = _docker_cli("ps", "-aq", "--filter", f"label=cloudlet.owner={owner}")
        ids = listed.stdout.decode().split()
        if ids:
            _docker_cli("rm", "-f", *ids)
    _docker_cli("network", "rm", NETWORK, FRESH_NETWORK)
    _docker_cli("rmi", "-f", BUILT_IMAGE)


@pytest.fixture(scope="module", autouse=True)
def docker_image() -> Iterator[str]:
    if not _dockerd_reachable():
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but dockerd is not reachable at {SOCKET}: start it in CI")
        pytest.skip(f"dockerd is not reachable at {SOCKET}")
    if _docker_cli("image", "inspect", IMAGE).returncode != 0:
        _build_busybox_image()
    try:
        yield IMAGE
    finally:
        _remove_everything_of_this_run()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def runtime() -> AsyncIterator[DockerRuntime]:
    docker = DockerRuntime(OWNER, network=NETWORK)
    yield docker
    await docker.close()


@pytest_asyncio.fixture(loop_scope="module")
async def start(runtime: DockerRuntime) -> AsyncIterator[Starter]:
    """Starts instances (on ``runtime`` or another owner's) and stops them all when the test
    ends, whatever its outcome; through ``runtime``, as the other may be closed by then."""
    started: list[str] = []

    async def start_instance(spec: InstanceSpec, on: DockerRuntime = runtime) -> InstanceInfo:
        info = await on.start(spec)
        started.append(info.id)
        return info

    yield start_instance
    for instance_id in started:
        await runtime.stop(instance_id, grace_seconds=0)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def probe(runtime: DockerRuntime) -> AsyncIterator[InstanceInfo]:
    """One instance whose container reports what it sees; shared by the read-only tests."""
    info = await runtime.start(
        instance_spec(
            port=8081,
            command=("sh", "-c", PROBE_SCRIPT),
            env=(("GREETING", "hello world"), ("PORT", "1")),
            labels=(("team", "core"),),
            cpu_millis=500,
            memory_bytes=256 * MiB,
        )
    )
    await wait_for_port(info)
    yield info
    await runtime.stop(info.id, grace_seconds=0)


# -- helpers --------------------------------------------------------------------------------


def instance_spec(revision: str = "hello-00001-abc", **overrides: object) -> InstanceSpec:
    fields: dict[str, object] = {
        "service": "hello",
        "revision": revision,
        "configuration": "hello",
        "image": IMAGE,
    }
    return InstanceSpec(**(fields | overrides))  # type: ignore[arg-type]


async def wait_for_port(info: InstanceInfo, timeout: float = 10.0) -> float:
    """Seconds until the instance's port accepts a TCP connection."""
    began = time.monotonic()
    while True:
        try:
            _, writer = await asyncio.open_connection(info.host, info.port)
        except OSError:
            if time.monotonic() - began > timeout:
                raise
            await asyncio.sleep(0.005)
            continue
        writer.close()
        await writer.wait_closed()
        return time.monotonic() - began


async def fetch(info: InstanceInfo, path: str = "/", timeout: float = 10.0) -> str:
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(f"http://{info.host}:{info.port}{path}")
    response.raise_for_status()
    return response.text


async def wait_until_exited(runtime: DockerRuntime, instance_id: str) -> None:
    for _ in range(200):
        if not (await runtime.state(instance_id)).running:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{instance_id} still runs")


async def death_of(
    runtime: DockerRuntime, instance_id: str, since: float, action: str = "die"
) -> InstanceEvent:
    async def first_event() -> InstanceEvent:
        async with aclosing(runtime.events(since=since)) as events:
            async for event in events:
                if event.instance_id == instance_id and event.action == action:
                    return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(first_event(), timeout=20)


def cgroup_value(controller: str, instance_id: str, name: str) -> str:
    return (CGROUP / controller / "docker" / instance_id / name).read_text().strip()


# -- the container's contract ---------------------------------------------------------------


async def test_start_returns_an_address_that_serves_http(start: Starter) -> None:
    info = await start(instance_spec())
    await wait_for_port(info)
    assert info.running and info.port == 8080
    assert await fetch(info) == "hello from the cloudlet test image\n"


async def test_container_sees_the_contract_env_and_the_revision_env(probe: InstanceInfo) -> None:
    env = dict(line.split("=", 1) for line in (await fetch(probe, "/env.txt")).splitlines())
    assert env["PORT"] == "8081"  # the contract's PORT wins over the user's
    assert env["K_SERVICE"] == "hello"
    assert env["K_REVISION"] == "hello-00001-abc"
    assert env["K_CONFIGURATION"] == "hello"
    assert env["GREETING"] == "hello world"


async def test_container_carries_cloudlet_labels_and_the_specs(
    runtime: DockerRuntime, probe: InstanceInfo
) -> None:
    labels = (await runtime.engine.container_inspect(probe.id))["Config"]["Labels"]
    assert labels == labels | {
        "cloudlet.managed": "true",
        "cloudlet.owner": OWNER,
        "cloudlet.service": "hello",
        "cloudlet.revision": "hello-00001-abc",
        "cloudlet.configuration": "hello",
        "cloudlet.port": "8081",
        "team": "core",
    }


async def test_cpu_memory_and_pids_limits_are_in_the_cgroup(probe: InstanceInfo) -> None:
    assert cgroup_value("cpu", probe.id, "cpu.cfs_period_us") == "100000"
    assert cgroup_value("cpu", probe.id, "cpu.cfs_quota_us") == "50000"
    assert cgroup_value("memory", probe.id, "memory.limit_in_bytes") == str(256 * MiB)
    assert cgroup_value("pids", probe.id, "pids.max") == "2048"
    memsw = CGROUP / "memory" / "docker" / probe.id / "memory.memsw.limit_in_bytes"
    if memsw.exists():  # only with swap accounting on
        assert memsw.read_text().strip() == str(256 * MiB)


async def test_no_ports_are_published_and_privileges_are_cut(
    runtime: DockerRuntime, probe: InstanceInfo
) -> None:
    info = await runtime.engine.container_inspect(probe.id)
    assert not info["HostConfig"]["PortBindings"]
    assert not any(info["NetworkSettings"]["Ports"].values())
    assert info["HostConfig"]["Privileged"] is False
    status = dict(line.split(":\t") for line in (await fetch(probe, "/status.txt")).splitlines())
    assert status["NoNewPrivs"] == "1"
    capabilities = int(status["CapEff"], 16)
    for dropped in (13, 27, 29):  # CAP_NET_RAW, CAP_MKNOD, CAP_AUDIT_WRITE
        assert not capabilities & (1 << dropped)


async def test_tmp_is_a_world_writable_tmpfs_and_stdin_is_at_eof(probe: InstanceInfo) -> None:
    assert (await fetch(probe, "/mounts.txt")).startswith("tmpfs /tmp tmpfs rw,nosuid,nodev")
    assert (await fetch(probe, "/tmpmode.txt")).strip() == "1777"
    assert (await fetch(probe, "/stdin.txt")).strip() == "1"  # `read` failed: EOF


# -- images ---------------------------------------------------------------------------------


async def test_ensure_image_resolves_untagged_names_to_latest(runtime: DockerRuntime) -> None:
    image_id = await runtime.ensure_image("cloudlet-test-busybox")
    assert image_id.startswith("sha256:")
    assert await runtime.ensure_image(image_id) == image_id


async def test_a_missing_image_is_named_with_the_fix(runtime: DockerRuntime) -> None:
    with pytest.raises(ImageNotFound) as raised:
        await runtime.ensure_image("eu.gcr.io/proj/my-dj-app")
    assert "eu.gcr.io/proj/my-dj-app:latest" in raised.value.message
    assert "cloudlet builds submit --tag eu.gcr.io/proj/my-dj-app:latest" in raised.value.message
    assert raised.value.user_fault


async def test_starting_a_missing_image_leaves_no_container(runtime: DockerRuntime) -> None:
    with pytest.raises(ImageNotFound, match="not-there"):
        await runtime.start(instance_spec("gone-00001-abc", image=f"not-there-{RUN}"))
    assert not await _containers_of_revision(runtime, "gone-00001-abc")


async def test_a_failed_start_removes_its_container(runtime: DockerRuntime) -> None:
    with pytest.raises(RuntimeFailure, match="no-such-binary"):
        await runtime.start(instance_spec("bad-00001-abc", command=("/no-such-binary",)))
    assert not await _containers_of_revision(runtime, "bad-00001-abc")


async def _containers_of_revision(runtime: DockerRuntime, revision: str) -> list[object]:
    labels = [f"cloudlet.owner={OWNER}", f"cloudlet.revision={revision}"]
    return list(await runtime.engine.container_list(labels, running_only=False))


# -- dying, stopping, throttling --------------------------------------------------------------


async def test_a_crash_at_start_shows_its_exit_code_and_stderr(
    runtime: DockerRuntime, start: Starter
) -> None:
    since = time.time()
    script = 'echo "boom: DATABASE_URL is not set" >&2; exit 3'
    info = await start(instance_spec(command=("sh", "-c", script)))
    await wait_until_exited(runtime, info.id)
    state = await runtime.state(info.id)
    assert (state.running, state.exit_code, state.oom_killed) == (False, 3, False)
    assert "boom: DATABASE_URL is not set" in await runtime.logs_tail(info.id)
    assert await death_of(runtime, info.id, since) == InstanceEvent(info.id, "die", 3)


async def test_a_process_over_the_memory_limit_is_reported_as_oom(
    runtime: DockerRuntime, start: Starter
) -> None:
    # A child (like a gunicorn worker) dies, so the container lives on and the engine sees
    # the kill. (When PID 1 itself is the victim, dockerd 20.10 often misses it: exit 137.)
    since = time.time()
    script = "dd if=/dev/zero of=/dev/null bs=64M count=1; exec sleep 1000"
    info = await start(instance_spec(command=("sh", "-c", script), memory_bytes=16 * MiB))
    assert await death_of(runtime, info.id, since, "oom") == InstanceEvent(info.id, "oom", None)


async def test_stop_sends_sigterm_then_removes_the_container(
    runtime: DockerRuntime, start: Starter
) -> None:
    since = time.time()
    info = await start(instance_spec(command=("sh", "-c", TERM_TRAP_SCRIPT)))
    await runtime.throttle(info.id)  # stop must lift it so the handler can run
    began = time.monotonic()
    await runtime.stop(info.id, grace_seconds=5)
    assert time.monotonic() - began < 4  # the handler ran; no SIGKILL after the grace
    assert (await death_of(runtime, info.id, since)).exit_code == 42
    with pytest.raises(NoSuchObject):
        await runtime.engine.container_inspect(info.id)
    assert not (await runtime.state(info.id)).running
    await runtime.stop(info.id)  # idempotent


async def test_throttle_cuts_the_cgroup_quota_and_unthrottle_restores_it(
    runtime: DockerRuntime, start: Starter
) -> None:
    info = await start(instance_spec())
    await wait_for_port(info)
    assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "100000"
    await runtime.throttle(info.id)
    assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "1000"
    assert "cloudlet test image" in await fetch(info)  # slowly, but it still answers
    await runtime.unthrottle(info.id, 1000)
    assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "100000"
    assert runtime.throttle_now(info.id) and runtime.unthrottle_now(info.id, 2000)
    assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "200000"


async def test_throttle_falls_back_to_the_engine_without_the_cgroup_file(
    start: Starter,
) -> None:
    blind = DockerRuntime(OWNER, network=NETWORK, cgroup_root="/nonexistent")
    try:
        info = await start(instance_spec(cpu_boost=True), on=blind)
        assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "200000"  # boosted
        assert not blind.throttle_now(info.id)
        await blind.throttle(info.id)
        assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "1000"
        await blind.unthrottle(info.id, 1000)
        assert cgroup_value("cpu", info.id, "cpu.cfs_quota_us") == "100000"
    finally:
        await blind.close()


async def test_concurrent_first_starts_create_one_network(start: Starter) -> None:
    fresh = DockerRuntime(OWNER, network=FRESH_NETWORK)
    try:
        started = await asyncio.gather(*(start(instance_spec(), on=fresh) for _ in range(3)))
    finally:
        await fresh.close()
    assert all(info.host for info in started)
    listed = _docker_cli("network", "ls", "-q", "--filter", f"name=^{FRESH_NETWORK}$")
    assert len(listed.stdout.split()) == 1


# -- adoption and streams -------------------------------------------------------------------


async def test_list_instances_returns_only_this_owners_running_instances(
    runtime: DockerRuntime, start: Starter
) -> None:
    other = DockerRuntime(OTHER_OWNER, network=NETWORK)
    try:
        mine = await start(instance_spec("mine-00001-abc", port=9000))
        theirs = await start(instance_spec("theirs-00001-abc"), on=other)
        listed = {info.id: info for info in await runtime.list_instances()}
        assert theirs.id not in listed
        adopted = listed[mine.id]
        assert (adopted.host, adopted.port, adopted.revision) == (mine.host, 9000, mine.revision)
        assert [info.id for info in await other.list_instances()] == [theirs.id]
    finally:
        await other.close()


async def test_stream_logs_follows_both_streams_until_exit(
    runtime: DockerRuntime, start: Starter
) -> None:
    script = "echo one; echo two >&2; sleep 0.3; echo three; exit 0"
    info = await start(instance_spec(command=("sh", "-c", script)))
    async with aclosing(runtime.stream_logs(info.id)) as stream:
        lines = await asyncio.wait_for(_collect(stream), timeout=20)
    stdout = [line.line for line in lines if line.stream == "stdout"]
    stderr = [line.line for line in lines if line.stream == "stderr"]
    assert (stdout, stderr) == (["one", "three"], ["two"])
    assert all(abs(line.timestamp.timestamp() - time.time()) < 60 for line in lines)


async def _collect(stream: AsyncIterator[LogLine]) -> list[LogLine]:
    return [item async for item in stream]


# -- the engine client itself ---------------------------------------------------------------


async def test_build_streams_the_context_and_reports_progress(runtime: DockerRuntime) -> None:
    dockerfile = f"FROM {IMAGE}\nCOPY greeting.txt /www/\nRUN echo built > /www/built.txt\n"
    messages = [
        message
        async for message in runtime.engine.build(
            _tar_chunks({"Dockerfile": dockerfile, "greeting.txt": "hi\n"}), BUILT_IMAGE
        )
    ]
    assert not [m for m in messages if "error" in m], messages
    built_ids = [m["aux"]["ID"] for m in messages if "ID" in m.get("aux", {})]
    assert built_ids == [await runtime.ensure_image(BUILT_IMAGE)]


async def test_a_failing_build_yields_the_error(runtime: DockerRuntime) -> None:
    context = _tar_chunks({"Dockerfile": f"FROM {IMAGE}\nRUN exit 9\n"})
    messages = [message async for message in runtime.engine.build(context, BUILT_IMAGE)]
    assert "returned a non-zero code: 9" in messages[-1]["error"]


async def _tar_chunks(files: dict[str, str]) -> AsyncIterator[bytes]:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    data = buffer.getvalue()
    for offset in range(0, len(data), 1024):  # several chunks: the body is streamed
        yield data[offset : offset + 1024]


async def test_an_absent_engine_says_how_to_start_it() -> None:
    nowhere = DockerRuntime(OWNER, socket_path="/nonexistent/docker.sock")
    try:
        with pytest.raises(EngineUnavailable, match="start it with `dockerd &`"):
            await nowhere.ensure_image(IMAGE)
    finally:
        await nowhere.close()
