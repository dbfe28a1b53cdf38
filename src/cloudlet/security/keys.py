"""The server's key files: created once with mode 0600 in a 0700 directory.

They live in CLOUDLET_HOME/keys, apart from the database, so a copy of ``cloudlet.db``
(a backup, a bug report) carries neither the secrets' key nor the token-signing key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def key_dir(home: Path) -> Path:
    path = home / "keys"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's bytes; on first use, ``make()`` written with mode 0600 (never replaced)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its key
        return path.read_bytes()
    with os.fdopen(fd, "wb") as handle:
        handle.write(make())
    return path.read_bytes()


def signing_key(home: Path) -> Ed25519PrivateKey:
    """The Ed25519 key that signs identity tokens (CLOUDLET_HOME/keys/identity.pem)."""

    def make() -> bytes:
        return Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    key = serialization.load_pem_private_key(
        read_or_create(key_dir(home) / "identity.pem", make), None
    )
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{home / 'keys' / 'identity.pem'} is not an Ed25519 private key")
    return key


def secrets_key(home: Path) -> bytes:
    """The 256-bit AES-GCM key that encrypts secret versions (CLOUDLET_HOME/keys/secrets.key)."""
    return read_or_create(key_dir(home) / "secrets.key", lambda: os.urandom(32))
