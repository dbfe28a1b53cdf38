"""Fixtures shared by the unit tests of secrets (env vars and files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cloudlet.security.secrets import SecretVault
from cloudlet.store import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A real resource store (modules with a LogStore fixture of this name override it)."""
    return Store(tmp_path / "cloudlet.db")


@pytest.fixture
def vault(store: Store) -> SecretVault:
    return SecretVault(store, os.urandom(32), clock=lambda: 1_800_000_000.0)
