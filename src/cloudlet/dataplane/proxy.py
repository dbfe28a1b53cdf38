"""The router: settings, the listening socket, and the sweep that enforces timeouts.

``RouterProtocol`` (``client``) serves each client connection; ``Exchange`` (``exchange``)
carries one request to an instance over an ``UpstreamConnection`` (``upstream``) taken from
the instance's keep-alive pool.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from cloudlet.dataplane.client import RouterProtocol
from cloudlet.dataplane.routing import RoutingTable

__all__ = ["Router", "RouterProtocol", "RouterSettings", "start_router"]


@dataclass(frozen=True)
class RouterSettings:
    """Limits of the router's client side."""

    max_header_bytes: int = 64 * 1024
    """Request line plus headers; more gets 431."""
    max_headers: int = 200
    """Header fields in one request; more gets 431."""
    max_body_bytes: int = 32 * 1024 * 1024
    """Request body; more gets 413 (Cloud Run's limit for HTTP/1)."""
    client_idle_timeout: float = 60.0
    """Seconds a keep-alive connection may wait for its next request."""
    header_timeout: float = 10.0
    """Seconds to send a whole request head (cuts off slowloris clients)."""
    max_client_connections: int = 10_000
    """Open client connections; more are answered 503 and closed."""
    server_name: str = "cloudlet"
    """The ``Server`` header of the router's own responses."""


class Router:
    """The router: a routing table served on a listening socket."""

    def __init__(
        self,
        table: RoutingTable,
        settings: RouterSettings | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.table = table
        self.settings = settings or RouterSettings()
        self.server_name = self.settings.server_name.encode()
        self.connections: set[RouterProtocol] = set()
        self.random_bits = (rng or random.Random()).getrandbits
        self.server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = max(
            0.02, min(1.0, self.settings.header_timeout / 4, self.settings.client_idle_timeout / 4)
        )

    async def start(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: RouterProtocol(self), host, port, reuse_address=True, backlog=2048
        )
        self._sweeper = loop.call_later(self._tick, self._sweep)
        return self.server

    def _sweep(self) -> None:
        server = self.server
        serving = server is not None and server.is_serving()
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            conn.check_timeouts(now, serving)
        if serving or self.connections:
            self._sweeper = asyncio.get_running_loop().call_later(self._tick, self._sweep)
        else:
            self._sweeper = None

    def close(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.check_timeouts(0.0, serving=False)

    async def aclose(self, grace: float = 10.0) -> None:
        """Close, wait up to ``grace`` seconds for responses in progress, then cut them."""
        self.close()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + grace
        while self.connections and loop.time() < give_up:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        await asyncio.sleep(0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self.server is not None:
            await self.server.wait_closed()


async def start_router(
    table: RoutingTable, host: str, port: int, settings: RouterSettings
) -> asyncio.Server:
    """Serve ``table`` on host:port. Closing the server also closes idle client connections
    (within one sweep tick); busy ones close after their response."""
    return await Router(table, settings).start(host, port)
