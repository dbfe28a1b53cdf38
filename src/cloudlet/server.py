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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from cloudlet.autoscaler.reconciler import Reconciler
from cloudlet.autoscaler.throttle import compose_hooks
from cloudlet.controlplane.api import build_api
from cloudlet.controlplane.builds import BuildService
from cloudlet.controlplane.controller import Controller
from cloudlet.controlplane.security_api import SecurityParts
from cloudlet.controlplane.services import ServiceManager, Urls
from cloudlet.controlplane.tls import ServerCert, issue_server_cert
from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.proxy import RouterSettings, start_router
from cloudlet.dataplane.routing import RoutingTable
from cloudlet.domain.autoscale import ScalingPolicy
from cloudlet.runtimes.base import Runtime, RuntimeFailure
from cloudlet.runtimes.docker import DockerRuntime
from cloudlet.security import keys
from cloudlet.security.access import AccessGate, local_networks
from cloudlet.security.secrets import SecretEnv, SecretVault
from cloudlet.security.tokens import Verifier
from cloudlet.settings import Settings
from cloudlet.store import Store
from cloudlet.telemetry.collector import Telemetry
from cloudlet.telemetry.logs import LogStore
from cloudlet.telemetry.writer import LogWriter

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
        self._telemetry = telemetry = _telemetry(s, self.runtime)
        await telemetry.sink.start()
        table.on_request_done = telemetry.request_done
        self._router = await start_router(table, s.host, s.port, RouterSettings())
        router_port = self._router.sockets[0].getsockname()[1]
        self._store = Store(s.database)
        services = ServiceManager(self._store, Urls(s.domain, router_port))
        defaults = ScalingPolicy(
            stable_window=s.stable_window, scale_to_zero_grace=s.scale_to_zero_grace
        )
        reconciler = Reconciler(
            self.runtime,
            services.set_revision_status,
            defaults,
            shutdown_grace=s.shutdown_grace,
            observer=telemetry,
        )
        telemetry.live_runs = reconciler.revisions
        signer = keys.signing_key(s.home)
        gate = AccessGate(Verifier(signer.public_key()), local_networks())
        table.authorize, table.screen = gate.authorize, gate.screen
        vault = SecretVault(self._store, keys.secrets_key(s.home))
        reconciler.prepare = SecretEnv(vault, self._store)
        services.check_secret = vault.require
        controller = Controller(self._store, services, reconciler, table, gate)
        services.subscribe(controller.changed)
        controller.sync_all()
        await reconciler.adopt()
        gate.networks = local_networks(await self._bridge_subnets())
        engine = self.runtime.engine if isinstance(self.runtime, DockerRuntime) else None
        self._builds = BuildService(self._store, engine)
        app = build_api(
            services,
            token,
            self.runtime.ensure_image,
            builds=self._builds,
            security=SecurityParts(signer, vault),
            metrics=telemetry.render_metrics,
            telemetry=telemetry,
        )
        self._api = _api_server(app)
        self._tasks = [
            asyncio.create_task(self._api.serve(sockets=[api_sock])),
            asyncio.create_task(reconciler.run()),
            asyncio.create_task(self._watch_exits(reconciler)),
            asyncio.create_task(telemetry.run()),
        ]
        tls_url = await self._serve_tls(app, tls_sock) if tls_sock else None
        while not self._api.started:
            await asyncio.sleep(0.01)
        api_url = f"http://{s.api_host}:{api_port}"
        self._write_info(api_url, router_port, tls_url)
        self.running = Running(api_url, router_port, services, reconciler, table)
        return self.running

    async def _bridge_subnets(self) -> list[str]:
        """The instances' network's subnets: callers from there count as internal."""
        if not isinstance(self.runtime, DockerRuntime):
            return []
        try:
            await self.runtime._ensure_network()
            network = await self.runtime.engine.network_inspect(self.settings.network)
        except RuntimeFailure as error:
            log.warning("cannot read the %s network: %s", self.settings.network, error.message)
            return []
        configs = ((network or {}).get("IPAM") or {}).get("Config") or []
        return [str(c["Subnet"]) for c in configs if c.get("Subnet")]

    async def _serve_tls(self, app: Any, sock: socket.socket) -> str:
        """The control API over HTTPS too (kubectl sends tokens only over TLS); its URL."""
        cert = issue_server_cert(self.settings.home, self.settings.api_tls_host)
        self._tls_api = _api_server(app, cert)
        self._tls_task = asyncio.create_task(self._tls_api.serve(sockets=[sock]))
        while not self._tls_api.started and not self._tls_task.done():
            await asyncio.sleep(0.01)
        if self._tls_task.done():
            self._tls_task.result()  # a listener that failed to start fails the server
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
        self._telemetry.followers.close()  # open log tails end, so the API can stop
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
        await self._telemetry.close()
        self._telemetry.store.close()
        if self._builds is not None:
            await self._builds.close()
        await self.runtime.close()
        if self._store is not None:
            self._store.close()


def _telemetry(settings: Settings, runtime: Runtime) -> Telemetry:
    store = LogStore(settings.logs_database, settings.log_retention_bytes)
    writer = LogWriter(settings.logs_database, settings.log_retention_bytes)
    telemetry = Telemetry(store, runtime, sink=writer)
    telemetry.install_hooks = _instance_hooks(telemetry)
    return telemetry


def _instance_hooks(telemetry: Telemetry) -> Callable[[RevisionEndpoint], None]:
    """The one place each revision's per-instance busy/idle hooks are installed (hot path:
    keep every call O(1)). Billing's meter is one observer; CPU throttling is another."""

    def install(endpoint: RevisionEndpoint) -> None:
        meter_busy, meter_idle = telemetry.backend_busy, telemetry.backend_idle

        def busy(instance_id: str) -> None:
            meter_busy(instance_id)  # billing: the instance starts serving

        def idle(instance_id: str) -> None:
            meter_idle(instance_id)  # billing: the instance has nothing in flight

        # composed after hooks already there: the reconciler's CPU throttling (if the
        # revision throttles), which unthrottles before the request is forwarded
        endpoint.on_backend_busy = compose_hooks(endpoint.on_backend_busy, busy)
        endpoint.on_backend_idle = compose_hooks(endpoint.on_backend_idle, idle)

    return install


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
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per Engine API call
    uvloop.run(_main(settings))
