"""Identity tokens: JWTs signed with the server's Ed25519 key (alg EdDSA).

A token says who the caller is (``sub``/``email``: the account name; the IAM member is
``user:NAME``) and whom it is for (``aud``: a service URL, a custom audience, or
``CLI_AUDIENCE`` — what `cloudlet auth print-identity-token` uses without
``--audiences``, accepted by every service as Cloud Run accepts gcloud's own client id).
Tokens live an hour. Verification is pure apart from the signature check and takes the
time as an argument; ``Verifier`` caches verified tokens by their bytes until they expire.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ISSUER = "https://cloudlet.local"
CLI_AUDIENCE = "cloudlet-cli"
LIFETIME = 3600
LEEWAY = 30
"""Seconds of clock skew allowed on ``iat``."""
_CACHE_LIMIT = 10_000


class TokenError(Exception):
    """A token that does not prove anything; the message says why."""


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says."""

    member: str
    """The IAM member, ``user:NAME``."""
    audience: str
    expires: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: bytes) -> bytes:
    return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def mint(key: Ed25519PrivateKey, account: str, audience: str, now: float) -> str:
    """A token for ``account`` (member ``user:ACCOUNT``) addressed to ``audience``."""
    header = {"alg": "EdDSA", "typ": "JWT", "kid": key_id(key.public_key())}
    claims = {
        "iss": ISSUER,
        "sub": account,
        "email": account,
        "aud": audience,
        "iat": int(now),
        "exp": int(now) + LIFETIME,
    }
    signing_input = ".".join(_b64(json.dumps(part).encode()) for part in (header, claims))
    signature = key.sign(signing_input.encode())
    return f"{signing_input}.{_b64(signature)}"


def verify(public: Ed25519PublicKey, token: bytes, now: float) -> Identity:
    """The identity a token proves at time ``now``; raises TokenError otherwise."""
    claims = _signed_claims(public, token)
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, int) or not isinstance(iat, int):
        raise TokenError("the token has no exp/iat times")
    if now >= exp:
        raise TokenError("the token has expired; print a new one")
    if iat > now + LEEWAY:
        raise TokenError("the token was issued in the future")
    if claims.get("iss") != ISSUER:
        raise TokenError("the token was not issued by Cloudlet")
    sub, aud = claims.get("sub"), claims.get("aud")
    if not isinstance(sub, str) or not sub or not isinstance(aud, str):
        raise TokenError("the token has no subject or audience")
    return Identity(f"user:{sub}", aud, float(exp))


def _signed_claims(public: Ed25519PublicKey, token: bytes) -> dict[str, Any]:
    parts = token.split(b".")
    if len(parts) != 3:
        raise TokenError("not a JWT (expected three dot-separated parts)")
    try:
        header = json.loads(_unb64(parts[0]))
        signature = _unb64(parts[2])
    except (ValueError, binascii.Error):
        raise TokenError("the token is not valid base64url JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        raise TokenError("the token is not signed with EdDSA")
    try:
        public.verify(signature, parts[0] + b"." + parts[1])
    except InvalidSignature:
        raise TokenError("the token's signature is not valid") from None
    claims = json.loads(_unb64(parts[1]))
    if not isinstance(claims, dict):
        raise TokenError("the token's claims are not an object")
    return claims


class Verifier:
    """``verify`` with a cache: a token's bytes → its identity, until it expires."""

    def __init__(self, public: Ed25519PublicKey) -> None:
        self._public = public
        self._cache: dict[bytes, Identity] = {}

    def verify(self, token: bytes, now: float) -> Identity:
        known = self._cache.get(token)
        if known is not None:
            if now < known.expires:
                return known
            del self._cache[token]
        identity = verify(self._public, token, now)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {t: i for t, i in self._cache.items() if now < i.expires}
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache = {}
        self._cache[token] = identity
        return identity
