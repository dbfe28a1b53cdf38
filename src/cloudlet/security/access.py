"""Who may invoke a service: the router's invoker check and ingress screen.

The controller tells ``AccessGate`` each service's invoker members, custom audiences and
ingress whenever it rebuilds the service's route; the router asks it per request
(``screen`` with the client's address, then ``authorize`` with the Authorization header).
Public services on ``--ingress all`` never reach it: their routes are marked public and
take the router's fast path.

Refusals: an internal service answers 404 to a caller outside the machine and the
``cloudlet`` network (as Cloud Run does, so its existence is not revealed); a missing,
expired, tampered or wrongly addressed token gets 401; a valid token of a member without
roles/run.invoker gets 403.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cloudlet.dataplane.routing import ServiceRoute
from cloudlet.domain.errors import InvalidError
from cloudlet.security.tokens import CLI_AUDIENCE, TokenError, Verifier

INGRESS_KEY = "run.googleapis.com/ingress"
AUDIENCES_KEY = "run.googleapis.com/custom-audiences"
INGRESS_VALUES = ("all", "internal")
PUBLIC_MEMBER = "allUsers"
ANY_SIGNED_IN = "allAuthenticatedUsers"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Refusal = tuple[int, str]

NO_TOKEN = (
    "this service requires authentication: send `Authorization: Bearer TOKEN` with a token "
    "from `cloudlet auth print-identity-token`"
)


@dataclass(frozen=True)
class Access:
    """One service's invocation policy, as the router needs it."""

    members: frozenset[str]
    """Members holding roles/run.invoker."""
    audiences: frozenset[str]
    """Accepted ``aud`` values: the service and tag URLs, custom audiences, the CLI's."""
    internal: bool = False


def ingress_of(annotations: Mapping[str, str]) -> str:
    """The service's ingress setting, validated: ``all`` (default) or ``internal``."""
    value = annotations.get(INGRESS_KEY, "all")
    if value not in INGRESS_VALUES:
        raise InvalidError(
            f"metadata.annotations[{INGRESS_KEY}]: {value!r} is not supported; use "
            f"{' or '.join(INGRESS_VALUES)} (--ingress)",
            field=f"metadata.annotations.{INGRESS_KEY}",
        )
    return value


def custom_audiences(annotations: Mapping[str, str]) -> list[str]:
    """The service's custom audiences: a JSON list of strings in the annotation."""
    raw = annotations.get(AUDIENCES_KEY)
    if raw is None:
        return []
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise InvalidError(
            f'metadata.annotations[{AUDIENCES_KEY}]: expected a JSON list such as ["my-api"]',
            field=f"metadata.annotations.{AUDIENCES_KEY}",
        )
    return value


def local_networks(extra: Iterable[str] = ()) -> list[Network]:
    """Loopback plus the given subnets (the ``cloudlet`` bridge network's)."""
    nets = ["127.0.0.0/8", "::1/128", *extra]
    return [ipaddress.ip_network(n, strict=False) for n in nets]


class AccessGate:
    """Per-service invocation policies and the per-request checks on them."""

    def __init__(
        self,
        verifier: Verifier,
        networks: list[Network],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._verifier = verifier
        self.networks = networks
        self._clock = clock
        self._access: dict[str, Access] = {}
        self._local: dict[str, bool] = {}

    def set(self, service: str, access: Access) -> None:
        self._access[service] = access

    def remove(self, service: str) -> None:
        self._access.pop(service, None)

    def get(self, service: str) -> Access | None:
        return self._access.get(service)

    def screen(self, route: ServiceRoute, ip: str) -> Refusal | None:
        """404 for an internal service called from outside; None lets the request on."""
        access = self._access.get(route.service)
        if access is None or not access.internal or self._is_local(ip):
            return None
        return 404, "no service is deployed here for callers outside this machine"

    def authorize(self, route: ServiceRoute, authorization: bytes | None) -> Refusal | None:
        """401 without a valid token for this service, 403 without roles/run.invoker."""
        access = self._access.get(route.service)
        if access is None:
            return 403, "this service has no invoker policy yet"
        if PUBLIC_MEMBER in access.members:
            return None
        scheme, _, token = (authorization or b"").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return 401, NO_TOKEN
        try:
            identity = self._verifier.verify(token.strip(), self._clock())
        except TokenError as error:
            return 401, f"invalid identity token: {error}"
        if identity.audience not in access.audiences:
            return 401, f"the token is for {identity.audience!r}, not for this service"
        if identity.member in access.members or ANY_SIGNED_IN in access.members:
            return None
        return 403, f"{identity.member} lacks roles/run.invoker on service {route.service}"

    def _is_local(self, ip: str) -> bool:
        known = self._local.get(ip)
        if known is None:
            try:
                address = ipaddress.ip_address(ip.removeprefix("::ffff:"))
            except ValueError:
                return False
            known = any(address in net for net in self.networks)
            if len(self._local) > 4096:
                self._local = {}
            self._local[ip] = known
        return known


def access_for(
    members: Iterable[str], urls: Iterable[str], annotations: Mapping[str, str]
) -> Access:
    """A service's Access from its invoker members, its URLs and its annotations."""
    audiences = {CLI_AUDIENCE, *custom_audiences(annotations)}
    for url in urls:
        audiences |= {url, url + "/"}
    return Access(frozenset(members), frozenset(audiences), ingress_of(annotations) == "internal")
