"""Identity tokens and the router's invoker/ingress gate, with the time as an argument."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudlet.dataplane.activator import RevisionEndpoint
from cloudlet.dataplane.routing import RoutingTable, ServiceRoute
from cloudlet.domain.errors import InvalidError
from cloudlet.security import keys
from cloudlet.security.access import AccessGate, access_for, local_networks
from cloudlet.security.tokens import CLI_AUDIENCE, LIFETIME, TokenError, Verifier, mint, verify

NOW = 1_800_000_000.0
URL = "http://hello.localhost:8080"
KEY = Ed25519PrivateKey.generate()


def _route(name: str = "hello") -> ServiceRoute:
    endpoint = RevisionEndpoint(name, f"{name}-00001-abc", container_concurrency=80, timeout=300)
    return ServiceRoute(name, ((endpoint, 100),), public=False)


def _gate(members: set[str], annotations: dict[str, str] | None = None) -> AccessGate:
    gate = AccessGate(Verifier(KEY.public_key()), local_networks(["172.30.0.0/16"]), lambda: NOW)
    gate.set("hello", access_for(members, [URL], annotations or {}))
    return gate


def _bearer(token: str) -> bytes:
    return f"Bearer {token}".encode()


def test_a_minted_token_verifies_to_its_member_and_audience() -> None:
    identity = verify(KEY.public_key(), mint(KEY, "ada", URL, NOW).encode(), NOW + 10)
    assert (identity.member, identity.audience, identity.expires) == (
        "user:ada",
        URL,
        NOW + LIFETIME,
    )


def test_an_expired_token_is_refused() -> None:
    token = mint(KEY, "ada", URL, NOW).encode()
    with pytest.raises(TokenError, match="expired"):
        verify(KEY.public_key(), token, NOW + LIFETIME)


def test_a_token_signed_by_another_key_is_refused() -> None:
    token = mint(Ed25519PrivateKey.generate(), "ada", URL, NOW).encode()
    with pytest.raises(TokenError, match="signature"):
        verify(KEY.public_key(), token, NOW)


def test_a_tampered_claim_breaks_the_signature() -> None:
    header, claims, signature = mint(KEY, "ada", URL, NOW).split(".")
    forged = json.loads(base64.urlsafe_b64decode(claims + "=="))
    forged["sub"] = "root"
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(TokenError, match="signature"):
        verify(KEY.public_key(), f"{header}.{body}.{signature}".encode(), NOW)


@pytest.mark.parametrize("garbage", [b"", b"a.b", b"x.y.z", b"\xff.\xfe.\x00", b"...."])
def test_garbage_is_a_token_error_not_a_crash(garbage: bytes) -> None:
    with pytest.raises(TokenError):
        verify(KEY.public_key(), garbage, NOW)


def test_an_alg_none_token_is_refused() -> None:
    _, claims, _ = mint(KEY, "ada", URL, NOW).split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    with pytest.raises(TokenError, match="EdDSA"):
        verify(KEY.public_key(), f"{header}.{claims}.".encode(), NOW)


def test_the_verifier_caches_until_expiry_and_then_refuses() -> None:
    verifier = Verifier(KEY.public_key())
    token = mint(KEY, "ada", URL, NOW).encode()
    assert verifier.verify(token, NOW) is verifier.verify(token, NOW + 1)
    with pytest.raises(TokenError, match="expired"):
        verifier.verify(token, NOW + LIFETIME)


def test_no_token_is_401() -> None:
    refusal = _gate({"user:ada"}).authorize(_route(), None)
    assert refusal is not None and refusal[0] == 401


def test_a_token_for_another_audience_is_401() -> None:
    token = mint(KEY, "ada", "http://other.localhost:8080", NOW)
    assert _gate({"user:ada"}).authorize(_route(), _bearer(token)) == (
        401,
        "the token is for 'http://other.localhost:8080', not for this service",
    )


def test_a_valid_token_of_a_member_without_the_role_is_403() -> None:
    refusal = _gate({"user:ada"}).authorize(_route(), _bearer(mint(KEY, "bob", URL, NOW)))
    assert refusal is not None and refusal[0] == 403 and "user:bob" in refusal[1]


@pytest.mark.parametrize("audience", [URL, URL + "/", CLI_AUDIENCE, "my-api"])
def test_an_invoker_with_an_accepted_audience_passes(audience: str) -> None:
    gate = _gate({"user:ada"}, {"run.googleapis.com/custom-audiences": '["my-api"]'})
    assert gate.authorize(_route(), _bearer(mint(KEY, "ada", audience, NOW))) is None


def test_all_authenticated_users_admits_any_valid_token_but_not_none() -> None:
    gate = _gate({"allAuthenticatedUsers"})
    assert gate.authorize(_route(), _bearer(mint(KEY, "eve", URL, NOW))) is None
    assert gate.authorize(_route(), None) is not None


def test_all_users_needs_no_token() -> None:
    assert _gate({"allUsers"}).authorize(_route(), None) is None


@pytest.mark.parametrize(
    ("ip", "allowed"),
    [("127.0.0.1", True), ("::1", True), ("172.30.4.5", True), ("10.1.2.3", False), ("", False)],
)
def test_an_internal_service_answers_only_local_callers(ip: str, allowed: bool) -> None:
    gate = _gate({"allUsers"}, {"run.googleapis.com/ingress": "internal"})
    assert (gate.screen(_route(), ip) is None) is allowed
    assert _gate({"allUsers"}).screen(_route(), ip) is None  # ingress all: anyone


def test_the_routing_table_screens_then_authorizes_private_routes_only() -> None:
    gate = _gate({"user:ada"}, {"run.googleapis.com/ingress": "internal"})
    table = RoutingTable("localhost")
    table.authorize, table.screen = gate.authorize, gate.screen
    private = _route()
    assert table.refusal(private, None, "10.0.0.1") is not None
    assert table.refusal(private, None, "10.0.0.1")[0] == 404  # type: ignore[index]
    assert table.refusal(private, None, "127.0.0.1")[0] == 401  # type: ignore[index]
    public = ServiceRoute("hello", private.targets, public=True)
    assert table.refusal(public, None, "10.0.0.1") is None


@pytest.mark.parametrize(
    "annotations",
    [
        {"run.googleapis.com/ingress": "internal-and-cloud-load-balancing"},
        {"run.googleapis.com/custom-audiences": "my-api"},
        {"run.googleapis.com/custom-audiences": "[1]"},
    ],
)
def test_bad_ingress_or_audience_annotations_name_the_field(annotations: dict[str, str]) -> None:
    with pytest.raises(InvalidError) as caught:
        access_for((), (), annotations)
    assert caught.value.field and caught.value.field.startswith("metadata.annotations.")


def test_key_files_are_private_and_stable(tmp_path: Path) -> None:
    first = keys.signing_key(tmp_path)
    again = keys.signing_key(tmp_path)
    assert key_bytes(first) == key_bytes(again)
    assert len(keys.secrets_key(tmp_path)) == 32
    for name in ("identity.pem", "secrets.key"):
        assert stat.S_IMODE(os.stat(tmp_path / "keys" / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "keys").st_mode) == 0o700


def key_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
