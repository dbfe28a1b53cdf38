"""Shared fixtures: a real `cloudlet server` subprocess and the images tests deploy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudlet.settings import Settings
from tests.images import TESTAPP_DIR, TESTAPP_IMAGE, docker_available, ensure_image

REPO = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.25 s; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.25)


def require_docker() -> None:
    """Skip without dockerd on a developer machine; in CI a missing dockerd is a failure."""
    if docker_available():
        return
    if os.environ.get("CI"):
        pytest.fail("dockerd is not running in CI: .ci/run must start it")
    pytest.skip("dockerd is not running (start it with `dockerd &`)")


class CloudletServer:
    """A `cloudlet server` subprocess on free ports with its own CLOUDLET_HOME."""

    def __init__(self, home: Path, flags: list[str]) -> None:
        self.home = home
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ""
        self.router_port = 0
        self.log = home / "server.log"
        self.owner = Settings(home=home).owner

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDLET_")}
        return env | {"CLOUDLET_HOME": str(self.home)}

    def start(self) -> None:
        info = self.home / "server.json"
        info.unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "cloudlet",
            "server",
            "--port",
            "0",
            "--api-port",
            "0",
            *self.flags,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not info.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        data = json.loads(info.read_text())
        self.api = data["api"]
        self.router_port = int(data["router"].rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(
        self, *args: str, check: bool = True, timeout: float = 180, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "cloudlet", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"cloudlet {' '.join(args)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}\n--- server log ---\n"
                f"{self.log.read_text()[-4000:]}"
            )
        return done

    def url(self, service: str) -> str:
        return f"http://{service}.localhost:{self.router_port}"

    def request(
        self, service: str, path: str = "/", method: str = "GET", timeout: float = 60, **kwargs: Any
    ) -> httpx.Response:
        """A request through the router, addressed by Host as a browser would."""
        headers = {"Host": f"{service}.localhost:{self.router_port}", **kwargs.pop("headers", {})}
        return httpx.request(
            method,
            f"http://127.0.0.1:{self.router_port}{path}",
            headers=headers,
            timeout=timeout,
            **kwargs,
        )

    def containers(self, service: str | None = None) -> list[str]:
        """Running container ids this server owns (optionally one service's)."""
        args = [
            "docker",
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            f"label=cloudlet.owner={self.owner}",
        ]
        if service:
            args += ["--filter", f"label=cloudlet.service={service}"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        return out.split()

    def remove_containers(self) -> None:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=cloudlet.owner={self.owner}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)


@pytest.fixture(scope="session")
def testapp_image() -> str:
    require_docker()
    return ensure_image(TESTAPP_IMAGE, TESTAPP_DIR)


def _make(tmp_path_factory: pytest.TempPathFactory, flags: list[str]) -> CloudletServer:
    require_docker()
    return CloudletServer(tmp_path_factory.mktemp("cloudlet-home"), flags)


FAST_SCALING = ["--stable-window", "6s", "--scale-to-zero-grace", "2s"]


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, testapp_image: str
) -> Iterator[CloudletServer]:
    """One server per test module, scaling to zero after about 8 s idle."""
    srv = _make(tmp_path_factory, FAST_SCALING)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.remove_containers()


@pytest.fixture
def make_server(tmp_path_factory: pytest.TempPathFactory, testapp_image: str) -> Iterator[Any]:
    """Servers a test controls itself (restarts, special flags); cleaned up afterwards."""
    made: list[CloudletServer] = []

    def make(flags: list[str] | None = None) -> CloudletServer:
        srv = _make(tmp_path_factory, FAST_SCALING if flags is None else flags)
        made.append(srv)
        return srv

    yield make
    for srv in made:
        srv.stop()
        srv.remove_containers()
