"""The routing table: which revision a request goes to, by its Host header.

``SERVICE.DOMAIN`` splits among the service's traffic targets by their percents;
``TAG---SERVICE.DOMAIN`` goes to that tag's revision. The control plane replaces a
service's route whole with ``set_service``; the proxy only reads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from cloudlet.dataplane.activator import RevisionEndpoint

T = TypeVar("T")

Authorizer = Callable[["ServiceRoute", bytes | None], tuple[int, str] | None]

_CACHE_LIMIT = 4096
AUTH_REQUIRED = (
    "this service requires authentication: send an identity token of a member with "
    "roles/run.invoker (`cloudlet auth print-identity-token`), or make it public with "
    "`--allow-unauthenticated`"
)


@dataclass(frozen=True)
class ServiceRoute:
    """Where a service's traffic goes: revisions by percent, and tagged revisions."""

    service: str
    targets: tuple[tuple[RevisionEndpoint, int], ...]
    tags: Mapping[str, RevisionEndpoint] = field(default_factory=dict)
    public: bool = True
    """Whether allUsers may invoke it."""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"route of {self.service}: targets must not be empty")
        if any(not 0 <= percent <= 100 for _, percent in self.targets):
            raise ValueError(f"route of {self.service}: each target percent must be 0..100")
        total = sum(percent for _, percent in self.targets)
        if total != 100:
            raise ValueError(f"route of {self.service}: target percents sum to {total}, not 100")


class RequestRecord(NamedTuple):
    """One finished request as the router saw it, for request logs and metrics. Values are
    kept as they came off the wire (bytes, the trace id as an int when the router made it):
    the hot path only collects them, and the log writer decodes them in its own process."""

    end: float
    """Wall-clock time of the last response byte."""
    service: str | None
    revision: str | None
    backend: str | None
    method: bytes
    url: bytes
    status: int
    latency: float
    """Seconds from the request head's arrival to the last response byte."""
    request_bytes: int
    response_bytes: int
    remote_ip: str
    user_agent: bytes | None
    trace: int | bytes | None
    """The W3C trace id: an int when the router started the trace, else the caller's hex."""


def trace_text(trace: int | bytes | None) -> str | None:
    """A record's trace id as 32 hex digits (None when it has none)."""
    if isinstance(trace, int):
        return f"{trace:032x}"
    return trace.decode("latin-1") if trace is not None else None


def pick_weighted(targets: Sequence[tuple[T, int]], r: float) -> T:
    """The target whose share of 0..100 contains ``r * 100``, for ``r`` in [0, 1)."""
    point = r * 100
    upto = 0
    chosen = targets[-1][0]
    for target, percent in targets:
        upto += percent
        if point < upto:
            return target
        if percent:
            chosen = target
    return chosen


@dataclass(frozen=True, slots=True)
class HostEntry:
    """What a host name leads to."""

    route: ServiceRoute
    fixed: RevisionEndpoint | None
    """Set when the host always goes to one revision (a tag, or a single target)."""


class RoutingTable:
    """Host header → service route → revision endpoint."""

    def __init__(self, domain: str, rng: random.Random | None = None) -> None:
        self.domain = domain.lower().strip(".")
        self._random = (rng or random.Random()).random
        self._routes: dict[str, ServiceRoute] = {}
        self._hosts: dict[bytes, HostEntry] = {}
        self.cache: dict[bytes, HostEntry] = {}
        """Host header values as sent → entry, filled by ``lookup`` (the proxy's hot path
        reads it first)."""
        self.authorize: Authorizer | None = None
        """Given a route and the Authorization header: (status, message) refuses, None allows."""
        self.screen: Callable[[ServiceRoute, str], tuple[int, str] | None] | None = None
        """Given a non-public route and the client's IP: (status, message) refuses (ingress)."""
        self.on_request_done: Callable[[RequestRecord], None] | None = None
        """Called with a record of every finished request; no record is built when None."""

    def host_of(self, service: str, tag: str | None = None) -> str:
        return f"{tag}---{service}.{self.domain}" if tag else f"{service}.{self.domain}"

    @property
    def routes(self) -> Mapping[str, ServiceRoute]:
        return dict(self._routes)

    def set_service(self, route: ServiceRoute) -> None:
        self._routes[route.service] = route
        self._rebuild()

    def remove_service(self, service: str) -> None:
        if self._routes.pop(service, None) is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        hosts: dict[bytes, HostEntry] = {}
        for route in self._routes.values():
            live = [endpoint for endpoint, percent in route.targets if percent > 0]
            fixed = live[0] if len(live) == 1 else None
            hosts[self.host_of(route.service).encode()] = HostEntry(route, fixed)
            for tag, endpoint in route.tags.items():
                hosts[self.host_of(route.service, tag).encode()] = HostEntry(route, endpoint)
        self._hosts = hosts
        self.cache = {}

    def resolve(self, host: bytes) -> tuple[ServiceRoute, RevisionEndpoint] | None:
        """The route and revision for a Host header value (any case, port or not)."""
        entry = self.lookup(host)
        if entry is None:
            return None
        return entry.route, entry.fixed or self.pick(entry)

    def lookup(self, host: bytes) -> HostEntry | None:
        """The entry for a Host header value; ``resolve`` without building a pair, for the
        proxy's hot path (then ``entry.fixed or table.pick(entry)`` is the revision)."""
        entry = self.cache.get(host)
        if entry is None:
            entry = self._hosts.get(canonical_host(host))
            if entry is None:
                return None
            if len(self.cache) >= _CACHE_LIMIT:
                self.cache = {}
            self.cache[host] = entry
        return entry

    def pick(self, entry: HostEntry) -> RevisionEndpoint:
        """A revision among the entry's traffic targets, by their percents."""
        return pick_weighted(entry.route.targets, self._random())

    def refusal(
        self, route: ServiceRoute, authorization: bytes | None, ip: str = ""
    ) -> tuple[int, str] | None:
        """Why this request may not invoke the route, or None when it may (public routes
        always may: they take the proxy's fast path, which does not ask)."""
        if route.public:
            return None
        if self.screen is not None and (refused := self.screen(route, ip)) is not None:
            return refused
        if self.authorize is not None:
            return self.authorize(route, authorization)
        if route.public:
            return None
        return 403, AUTH_REQUIRED


def canonical_host(host: bytes) -> bytes:
    """Lowercase, no port, no trailing dot: ``Hello.Example.COM.:80`` → ``hello.example.com``."""
    host = host.strip()
    colon = host.rfind(b":")
    if colon != -1 and host.find(b"]", colon) == -1:
        host = host[:colon]
    return host.rstrip(b".").lower()
