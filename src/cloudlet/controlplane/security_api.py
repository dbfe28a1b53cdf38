"""Control API routes for identity tokens and secrets (Google's REST shapes).

``POST /v1/projects/-/serviceAccounts/ACCOUNT:generateIdToken`` mints an identity token
for member ``user:ACCOUNT`` (IAM Credentials' shape): whoever holds the control API's
token administers the server, so may act as any account. Secret routes follow Secret
Manager's v1 shape but never return a payload: values leave the server only into the
environment of the instances that reference them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from pydantic import BaseModel

from cloudlet.domain.errors import InvalidError
from cloudlet.security.secrets import SecretVault, validate_secret_name
from cloudlet.security.tokens import CLI_AUDIENCE, mint

SECRETS = "/v1/projects/{project}/secrets"
_ACCOUNT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_MAX_BODY = 256 * 1024


@dataclass
class SecurityParts:
    """What the security routes work with."""

    signer: Ed25519PrivateKey
    vault: SecretVault
    clock: Callable[[], float] = field(default=time.time)


async def _object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise InvalidError(f"body: larger than {_MAX_BODY} bytes", field="body")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise InvalidError("body: not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise InvalidError("body: expected a JSON object", field="body")
    return body


def validate_account(account: str) -> str:
    if not _ACCOUNT.match(account):
        raise InvalidError(
            f"account: {account!r} is not an account name; use letters, digits and . _ @ + -",
            field="account",
        )
    return account


def _audience(body: dict[str, Any]) -> str:
    audience = body.get("audience", CLI_AUDIENCE)
    if not isinstance(audience, str) or not audience or len(audience) > 2048:
        raise InvalidError("audience: expected a URL or a name (1-2048 chars)", field="audience")
    return audience


def _payload(body: dict[str, Any]) -> bytes:
    data = (
        (body.get("payload") or {}).get("data") if isinstance(body.get("payload"), dict) else None
    )
    if not isinstance(data, str):
        raise InvalidError(
            'payload.data: expected {"payload": {"data": BASE64}}', field="payload.data"
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidError("payload.data: not valid base64", field="payload.data") from None


def add_security_routes(app: FastAPI, parts: SecurityParts | None) -> None:
    """Register the token and secret routes (nothing when ``parts`` is None)."""
    if parts is None:
        return
    _token_routes(app, parts)
    _secret_routes(app, parts.vault)


def _token_routes(app: FastAPI, parts: SecurityParts) -> None:
    @app.post("/v1/projects/{project}/serviceAccounts/{account}:generateIdToken")
    async def generate_id_token(project: str, account: str, request: Request) -> dict[str, str]:
        audience = _audience(await _object(request))
        token = mint(parts.signer, validate_account(account), audience, parts.clock())
        return {"token": token}


def _secret_routes(app: FastAPI, vault: SecretVault) -> None:
    @app.get(SECRETS)
    async def list_secrets(project: str) -> dict[str, Any]:
        return {"secrets": vault.all(project)}

    @app.post(SECRETS)
    async def create_secret(project: str, request: Request) -> dict[str, Any]:
        await _object(request)
        return vault.create(project, request.query_params.get("secretId", ""))

    @app.post(SECRETS + "/{name}:addVersion")
    async def add_version(project: str, name: str, request: Request) -> dict[str, Any]:
        validate_secret_name(name, "secret")
        return vault.add_version(project, name, _payload(await _object(request)))

    @app.get(SECRETS + "/{name}/versions")
    async def list_versions(project: str, name: str) -> dict[str, Any]:
        versions = vault.versions(project, validate_secret_name(name, "secret"))
        return {"versions": versions, "totalSize": len(versions)}

    @app.delete(SECRETS + "/{name}")
    async def delete_secret(project: str, name: str) -> dict[str, Any]:
        vault.delete(project, validate_secret_name(name, "secret"))
        return {}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring a route's raw JSON body as ``model`` (its $refs inlined),
    so the spec describes what the route reads and API fuzzers have something to generate."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
