"""The SQLite store. Calls are short and synchronous: WAL with synchronous=NORMAL keeps a
commit well under a millisecond, so the event loop calls it directly."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudlet.domain.errors import ConflictError

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS resources (
        kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
        owner TEXT NOT NULL DEFAULT '', body TEXT NOT NULL, version INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (kind, namespace, name))""",
    """CREATE INDEX IF NOT EXISTS resources_owner ON resources (kind, namespace, owner)""",
]
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Record:
    """One stored resource: its body and the resourceVersion of its last write."""

    kind: str
    namespace: str
    name: str
    owner: str
    body: dict[str, Any]
    version: int


class Store:
    """Resources by (kind, namespace, name); ``owner`` links a revision to its service."""

    def __init__(self, path: Path | str) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            for statement in _SCHEMA:
                self._db.execute(statement)
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('version', '0')")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group writes atomically; nested use joins the outer transaction."""
        with self._lock:
            if self._db.in_transaction:
                yield
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _next_version(self) -> int:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='version'")
        row = self._db.execute("SELECT value FROM meta WHERE key='version'").fetchone()
        return int(row[0])

    def get(self, kind: str, namespace: str, name: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT kind, namespace, name, owner, body, version FROM resources "
                "WHERE kind=? AND namespace=? AND name=?",
                (kind, namespace, name),
            ).fetchone()
        return _record(row) if row else None

    def list(
        self, kind: str, namespace: str | None = None, owner: str | None = None
    ) -> list[Record]:
        query = "SELECT kind, namespace, name, owner, body, version FROM resources WHERE kind=?"
        params: list[Any] = [kind]
        if namespace is not None:
            query += " AND namespace=?"
            params.append(namespace)
        if owner is not None:
            query += " AND owner=?"
            params.append(owner)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created, name", params).fetchall()
        return [_record(row) for row in rows]

    def put(
        self,
        kind: str,
        namespace: str,
        name: str,
        body: dict[str, Any],
        *,
        owner: str = "",
        expect_version: int | None = None,
        now: float = 0.0,
    ) -> int:
        """Create or replace; with ``expect_version`` the write fails if another came first."""
        with self.transaction():
            current = self.get(kind, namespace, name)
            if expect_version is not None and (
                current is None or current.version != expect_version
            ):
                raise ConflictError(
                    f"metadata.resourceVersion: {kind} {name!r} was modified since version "
                    f"{expect_version}; read it again and retry",
                    field="metadata.resourceVersion",
                )
            version = self._next_version()
            self._db.execute(
                "INSERT INTO resources (kind, namespace, name, owner, body, version, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (kind, namespace, name) DO UPDATE "
                "SET body=excluded.body, version=excluded.version, owner=excluded.owner",
                (kind, namespace, name, owner, json.dumps(body), version, now),
            )
        return version

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        with self.transaction():
            cursor = self._db.execute(
                "DELETE FROM resources WHERE kind=? AND namespace=? AND name=?",
                (kind, namespace, name),
            )
            if cursor.rowcount:
                self._next_version()
        return bool(cursor.rowcount)

    def delete_owned(self, kind: str, namespace: str, owner: str) -> int:
        with self.transaction():
            cursor = self._db.execute(
                "DELETE FROM resources WHERE kind=? AND namespace=? AND owner=?",
                (kind, namespace, owner),
            )
        return cursor.rowcount

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return str(row[0]) if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def _record(row: tuple[Any, ...]) -> Record:
    kind, namespace, name, owner, body, version = row
    return Record(kind, namespace, name, owner, json.loads(body), int(version))
