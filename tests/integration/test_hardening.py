"""What a container may do, checked on real containers of a real dockerd."""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import CloudletServer

pytestmark = pytest.mark.docker

DOCKER_DEFAULT_CAPS = 0x00000000A80425FB
"""Docker's default capability set (chown, dac_override, fowner, fsetid, kill, setgid,
setuid, setpcap, net_bind_service, net_raw, sys_chroot, mknod, audit_write, setfcap)."""
DROPPED = {"NET_RAW": 13, "MKNOD": 27, "AUDIT_WRITE": 29}


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def container(server: CloudletServer, testapp_image: str) -> str:
    server.cli(
        "run", "deploy", "hardened", "--image", testapp_image, "--allow-unauthenticated",
        "--memory", "256Mi", "--cpu", "0.5",
    )  # fmt: skip
    assert server.request("hardened", "/").status_code == 200
    return server.containers("hardened")[0]


@pytest.fixture(scope="module")
def inspected(container: str) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_docker("inspect", container))[0]
    return info


def test_the_container_is_not_privileged_and_cannot_gain_privileges(
    inspected: dict[str, Any],
) -> None:
    host = inspected["HostConfig"]
    assert host["Privileged"] is False
    assert "no-new-privileges" in host["SecurityOpt"]
    assert not host.get("CapAdd")


def test_its_capabilities_are_dockers_defaults_minus_the_dropped_ones(container: str) -> None:
    status = _docker("exec", container, "cat", "/proc/1/status")
    effective = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    assert effective & ~DOCKER_DEFAULT_CAPS == 0
    for name, bit in DROPPED.items():
        assert not effective & (1 << bit), name
    assert "NoNewPrivs:\t1" in status


def test_pids_cpu_and_memory_are_limited(inspected: dict[str, Any]) -> None:
    host = inspected["HostConfig"]
    assert 0 < host["PidsLimit"] <= 4096
    assert host["Memory"] == 256 * 2**20 == host["MemorySwap"]
    assert host["CpuQuota"] > 0 and host["CpuPeriod"] > 0


def test_tmp_is_a_world_writable_sticky_tmpfs(container: str, inspected: dict[str, Any]) -> None:
    assert "/tmp" in inspected["HostConfig"]["Tmpfs"]
    assert _docker("exec", container, "stat", "-c", "%a", "/tmp").strip() == "1777"
    assert " /tmp tmpfs " in _docker("exec", container, "cat", "/proc/mounts")


def test_no_port_is_published_and_the_docker_socket_is_not_mounted(
    container: str, inspected: dict[str, Any]
) -> None:
    assert not inspected["HostConfig"].get("PortBindings")
    assert not inspected["NetworkSettings"].get("Ports") or all(
        not bound for bound in inspected["NetworkSettings"]["Ports"].values()
    )
    assert not any("docker.sock" in str(m) for m in inspected.get("Mounts", []))
    found = subprocess.run(
        ["docker", "exec", container, "sh", "-c", "ls /var/run/docker.sock /run/docker.sock"],
        capture_output=True,
        text=True,
    )
    assert found.returncode != 0


def test_a_container_over_its_memory_is_killed_replaced_and_the_reason_logged(
    server: CloudletServer, container: str
) -> None:
    answer = server.request("hardened", "/alloc?mb=400")
    assert answer.status_code >= 500
    assert server.request("hardened", "/").status_code == 200  # a new instance serves
    assert container not in server.containers("hardened")
    deadline = time.monotonic() + 30
    while "died: out of memory" not in server.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"instance {container[:12]}" in server.log.read_text()
    assert "died: out of memory" in server.log.read_text()
