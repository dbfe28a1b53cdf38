"""Host header → route → revision, and the weighted traffic split, without sockets."""

from __future__ import annotations

import random

import pytest

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.routing import (
    RoutingTable,
    ServiceRoute,
    canonical_host,
    pick_weighted,
)


class NoTimer:
    def cancel(self) -> None:
        pass


def endpoint(revision: str, service: str = "hello") -> RevisionEndpoint:
    return RevisionEndpoint(
        service, revision, container_concurrency=80, timeout=300, call_later=lambda d, cb: NoTimer()
    )


@pytest.fixture
def revisions() -> dict[str, RevisionEndpoint]:
    return {name: endpoint(name) for name in ("hello-00001", "hello-00002", "hello-00003")}


def target(table: RoutingTable, host: bytes) -> RevisionEndpoint | None:
    resolved = table.resolve(host)
    return resolved[1] if resolved is not None else None


def table_with(route: ServiceRoute, seed: int = 7) -> RoutingTable:
    table = RoutingTable("run.example.com", rng=random.Random(seed))
    table.set_service(route)
    return table


@pytest.mark.parametrize(
    ("targets", "r", "wanted"),
    [
        ([("a", 100)], 0.0, "a"),
        ([("a", 100)], 0.999, "a"),
        ([("a", 90), ("b", 10)], 0.0, "a"),
        ([("a", 90), ("b", 10)], 0.8999, "a"),
        ([("a", 90), ("b", 10)], 0.9, "b"),
        ([("a", 90), ("b", 10)], 0.9999, "b"),
        ([("a", 0), ("b", 100)], 0.0, "b"),
        ([("a", 50), ("b", 0), ("c", 50)], 0.5, "c"),
        ([("a", 100), ("b", 0)], 0.99999999, "a"),
    ],
)
def test_pick_weighted_maps_a_random_number_onto_the_percents(
    targets: list[tuple[str, int]], r: float, wanted: str
) -> None:
    assert pick_weighted(targets, r) == wanted


def test_a_90_10_split_lands_within_statistical_bounds(
    revisions: dict[str, RevisionEndpoint],
) -> None:
    one, two = revisions["hello-00001"], revisions["hello-00002"]
    table = table_with(ServiceRoute("hello", ((one, 90), (two, 10))), seed=42)
    picks = [table.resolve(b"hello.run.example.com") for _ in range(1000)]
    to_two = sum(1 for pick in picks if pick is not None and pick[1] is two)
    # binomial(1000, 0.1): mean 100, sd 9.5; five sd either side
    assert 52 <= to_two <= 148


def test_the_split_is_reproducible_with_a_seed(revisions: dict[str, RevisionEndpoint]) -> None:
    one, two = revisions["hello-00001"], revisions["hello-00002"]
    route = ServiceRoute("hello", ((one, 50), (two, 50)))

    def picks(seed: int) -> list[str]:
        table = table_with(route, seed)
        picked = [target(table, b"hello.run.example.com") for _ in range(20)]
        return [endpoint.revision for endpoint in picked if endpoint is not None]

    assert picks(1) == picks(1)
    assert picks(1) != picks(2)


@pytest.mark.parametrize(
    "host",
    [
        b"hello.run.example.com",
        b"hello.run.example.com:8080",
        b"HELLO.Run.Example.COM",
        b"hello.run.example.com.",
        b" hello.run.example.com:80 ",
    ],
)
def test_hosts_match_with_or_without_port_in_any_case(
    revisions: dict[str, RevisionEndpoint], host: bytes
) -> None:
    one = revisions["hello-00001"]
    table = table_with(ServiceRoute("hello", ((one, 100),)))
    resolved = table.resolve(host)
    assert resolved is not None
    assert resolved[1] is one


@pytest.mark.parametrize(
    "host",
    [b"", b"other.run.example.com", b"hello.example.com", b"hello", b"[::1]:8080", b"x---y"],
)
def test_unknown_hosts_resolve_to_nothing(
    revisions: dict[str, RevisionEndpoint], host: bytes
) -> None:
    table = table_with(ServiceRoute("hello", ((revisions["hello-00001"], 100),)))
    assert table.resolve(host) is None


def test_a_tag_has_its_own_host(revisions: dict[str, RevisionEndpoint]) -> None:
    one, two = revisions["hello-00001"], revisions["hello-00002"]
    table = table_with(ServiceRoute("hello", ((one, 100),), tags={"canary": two}))
    assert table.host_of("hello", "canary") == "canary---hello.run.example.com"
    assert target(table, b"canary---hello.run.example.com:8080") is two
    assert target(table, b"hello.run.example.com") is one
    assert table.resolve(b"other---hello.run.example.com") is None


def test_replacing_and_removing_a_service_takes_effect_at_once(
    revisions: dict[str, RevisionEndpoint],
) -> None:
    one, two = revisions["hello-00001"], revisions["hello-00002"]
    table = table_with(ServiceRoute("hello", ((one, 100),)))
    assert target(table, b"hello.run.example.com") is one
    table.set_service(ServiceRoute("hello", ((two, 100),)))
    assert target(table, b"hello.run.example.com") is two
    table.remove_service("hello")
    assert table.resolve(b"hello.run.example.com") is None
    table.remove_service("hello")  # twice is fine


def test_routes_are_checked(revisions: dict[str, RevisionEndpoint]) -> None:
    one, two = revisions["hello-00001"], revisions["hello-00002"]
    with pytest.raises(ValueError, match="sum to 90"):
        ServiceRoute("hello", ((one, 80), (two, 10)))
    with pytest.raises(ValueError, match=r"0\.\.100"):
        ServiceRoute("hello", ((one, 110), (two, -10)))
    with pytest.raises(ValueError, match="must not be empty"):
        ServiceRoute("hello", ())


def test_private_routes_are_refused_unless_an_authorizer_allows(
    revisions: dict[str, RevisionEndpoint],
) -> None:
    one = revisions["hello-00001"]
    public = ServiceRoute("hello", ((one, 100),))
    private = ServiceRoute("hello", ((one, 100),), public=False)
    table = RoutingTable("run.example.com")
    assert table.refusal(public, None) is None
    refusal = table.refusal(private, None)
    assert refusal is not None
    status, message = refusal
    assert status == 403
    assert message.startswith("this service requires authentication: ")

    def authorize(route: ServiceRoute, authorization: bytes | None) -> tuple[int, str] | None:
        if authorization is None:
            return 401, "send an identity token"
        return None if authorization == b"Bearer good" else (403, "not an invoker")

    table.authorize = authorize
    assert table.refusal(private, b"Bearer good") is None
    assert table.refusal(private, None) == (401, "send an identity token")
    assert table.refusal(private, b"Bearer bad") == (403, "not an invoker")


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        (b"Hello.Example.COM.:80", b"hello.example.com"),
        (b"a.b", b"a.b"),
        (b"a.b:", b"a.b"),
        (b"[::1]:8080", b"[::1]"),
        (b"[::1]", b"[::1]"),
    ],
)
def test_canonical_host(raw: bytes, canonical: bytes) -> None:
    assert canonical_host(raw) == canonical
