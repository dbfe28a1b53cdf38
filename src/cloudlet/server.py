"""`cloudlet server`: one asyncio (uvloop) loop running the control API, the router, the
reconcile loop and the runtime's event watch."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from cloudlet.autoscaler.reconciler import Reconciler
from cloudlet.controlplane.api import build_api
from cloudlet.controlplane.builds import BuildService
from cloudlet.controlplane.controller import Controller
from cloudlet.controlplane.services import ServiceManager, Urls
from cloudlet.controlplane.tls import ServerCert, issue_server_cert
from cloudlet.dataplane.proxy import RouterSettings, start_router
from cloudlet.dataplane.routing import RoutingTable
from cloudlet.domain.autoscale import ScalingPolicy
from cloudlet.runtimes.base import Runtime, RuntimeFailure
from cloudlet.runtimes.docker import DockerRuntime
from cloudlet.settings import Settings
from cloudlet.store import Store

log = logging.getLogger("cloudlet")


def _api_server(app: Any, cert: ServerCert | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        loop="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        ssl_certfile=cert.cert if cert else None,
        ssl_keyfile=cert.key if cert else None,
    )
    return uvicorn.Server(config)


def ensure_token(path: Path) -> str:
    """The control API's bearer token, created once with mode 0600."""
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@dataclass
class Running:
    """A started server: its bound addresses and the parts tests may look at."""

    api_url: str
    router_port: int
    services: ServiceManager
    reconciler: Reconciler
    table: RoutingTable


class Server:
    """Assembles the parts; ``start`` binds and begins serving, ``stop`` winds down."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or DockerRuntime(
            settings.owner, settings.network, settings.docker_socket
        )
        self._tasks: list[asyncio.Task[Any]] = []
        self._router: asyncio.AbstractServer | None = None
        self._api: uvicorn.Server | None = None
        self._store: Store | None = None
        self._builds: BuildService | None = None
        self._tls_api: uvicorn.Server | None = None

    async def start(self) -> Running:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = ensure_token(s.home / "token")
        api_sock = _bind(s.api_host, s.api_port)
        api_port = api_sock.getsockname()[1]
        tls_sock = _bind(s.api_tls_host, s.api_tls_port) if s.api_tls_port is not None else None
        table = RoutingTable(s.domain)
        self._router = await start_router(table, s.host, s.port, RouterSettings())
        router_port = self._router.sockets[0].getsockname()[1]
        self._store = Store(s.database)
        services = ServiceManager(self._store, Urls(s.domain, router_port))
        defaults = ScalingPolicy(
            stable_window=s.stable_window, scale_to_zero_grace=s.scale_to_zero_grace
        )
        reconciler = Reconciler(
            self.runtime, services.set_revision_status, defaults, shutdown_grace=s.shutdown_grace
        )
        controller = Controller(self._store, services, reconciler, table)
        services.subscribe(controller.changed)
        controller.sync_all()
        await reconciler.adopt()
        engine = self.runtime.engine if isinstance(self.runtime, DockerRuntime) else None
        self._builds = BuildService(self._store, engine)
        app = build_api(services, token, self.runtime.ensure_image, builds=self._builds)
        self._api = _api_server(app)
        self._tasks = [
            asyncio.create_task(self._api.serve(sockets=[api_sock])),
            asyncio.create_task(reconciler.run()),
            asyncio.create_task(self._watch_exits(reconciler)),
        ]
        tls_url = await self._serve_tls(app, tls_sock) if tls_sock else None
        while not self._api.started:
            await asyncio.sleep(0.01)
        api_url = f"http://{s.api_host}:{api_port}"
        self._write_info(api_url, router_port, tls_url)
        self.running = Running(api_url, router_port, services, reconciler, table)
        return self.running

    async def _serve_tls(self, app: Any, sock: socket.socket) -> str:
        """The control API over HTTPS too (kubectl sends tokens only over TLS); its URL."""
        cert = issue_server_cert(self.settings.home, self.settings.api_tls_host)
        self._tls_api = _api_server(app, cert)
        self._tls_task = asyncio.create_task(self._tls_api.serve(sockets=[sock]))
        while not self._tls_api.started and not self._tls_task.done():
            await asyncio.sleep(0.01)
        host, port = sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}" if port == 443 else f"https://{host}:{port}"

    def _write_info(self, api_url: str, router_port: int, tls_url: str | None = None) -> None:
        host = self.settings.host if self.settings.host not in ("", "0.0.0.0") else "127.0.0.1"
        info = {
            "api": api_url,
            "api_tls": tls_url,
            "router": f"http://{host}:{router_port}",
            "domain": self.settings.domain,
            "pid": os.getpid(),
        }
        # write then rename: clients polling for the file never read it half-written
        partial = self.settings.home / "server.json.partial"
        partial.write_text(json.dumps(info) + "\n")
        partial.replace(self.settings.home / "server.json")

    async def _watch_exits(self, reconciler: Reconciler) -> None:
        """Container exits reported by the engine reach the reconciler at once."""
        events = getattr(self.runtime, "events", None)
        if events is None:
            return
        while True:
            try:
                async for instance_id, action, code in events():
                    why = "out of memory" if action == "oom" else f"exited with code {code}"
                    reconciler.instance_died(instance_id, why)
            except RuntimeFailure as error:
                log.warning("lost the engine's event stream: %s; retrying", error.message)
            await asyncio.sleep(1.0)

    async def stop(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.settings.home / "server.json").unlink()
        if self._api is not None:
            self._api.should_exit = True
        if self._tls_api is not None:
            self._tls_api.should_exit = True
            await self._tls_task
        if self._router is not None:
            self._router.close()
        for task in self._tasks:
            if task is not self._tasks[0]:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.running.reconciler.close()
        if self._builds is not None:
            await self._builds.close()
        await self.runtime.close()
        if self._store is not None:
            self._store.close()


async def _main(settings: Settings) -> None:
    server = Server(settings)
    running = await server.start()
    log.info(
        "Cloudlet control API on %s, router on %s:%d (services at http://SERVICE.%s:%d)",
        running.api_url,
        settings.host,
        running.router_port,
        settings.domain,
        running.router_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down; instances keep running and are adopted by the next start")
    await server.stop()


def serve(settings: Settings) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvloop.run(_main(settings))
