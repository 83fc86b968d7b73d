"""Persistent context states behind a small interface; SQLite (WAL, synchronous=FULL) implements it.

A context is a server-generated id (uuid4 hex), the state blob (`ContextState.to_bytes()`) and its
metadata. Writes are compare-and-swap on a version number, so concurrent absorbs of one context never
lose an update, whichever process or thread makes them. Another database plugs in by implementing
`ContextStore`.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ..errors import GenAdapterError
from ..state import ContextState
from .errors import NotFound, VersionConflict

_ID = re.compile(r"[0-9a-f]{32}")
SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


def is_valid_id(value: object) -> bool:
    """Ids are exactly what new_id makes; anything else cannot name a stored context."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


@dataclass(frozen=True)
class ContextRecord:
    """Metadata of a stored context; `version` grows by one with every write."""

    id: str
    version: int
    created: float  # unix seconds
    updated: float
    num_tokens: int  # tokens the state holds (absorbed minus forgotten)
    nbytes: int  # tensor bytes of the state
    generator_fingerprint: str
    base_model: str
    sha256: str  # of the stored blob: equal digests mean bit-identical states


@dataclass(frozen=True)
class StoredContext:
    record: ContextRecord
    data: bytes  # ContextState.to_bytes()

    def state(self) -> ContextState:
        return ContextState.from_bytes(self.data, f"stored context {self.record.id}")


class ContextStore(ABC):
    """What the service needs from a database. Implementations must be safe to call from many threads."""

    @abstractmethod
    def get(self, context_id: str) -> StoredContext | None: ...

    def get_meta(self, context_id: str) -> ContextRecord | None:
        """Metadata only (override when the blob is expensive to fetch)."""
        stored = self.get(context_id)
        return stored.record if stored else None

    @abstractmethod
    def put(self, context_id: str, state: ContextState, expected_version: int | None) -> ContextRecord:
        """Create (expected_version None; the id must be new) or replace if the stored version is
        expected_version. Returns the new record once the write is durable; raises NotFound or
        VersionConflict."""

    @abstractmethod
    def delete(self, context_id: str) -> bool:
        """True if the context existed."""

    @abstractmethod
    def list(self, limit: int = 100, offset: int = 0) -> list[ContextRecord]:
        """Oldest first."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


_COLUMNS = "id, version, created, updated, num_tokens, nbytes, generator_fingerprint, base_model, sha256"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contexts (
    id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    num_tokens INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    generator_fingerprint TEXT NOT NULL,
    base_model TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    state BLOB NOT NULL
)
"""


class SQLiteStore(ContextStore):
    """One SQLite file in WAL mode with synchronous=FULL: a write is on disk before put() returns.

    One connection shared by all threads behind a lock (SQLite serialises writers anyway); other
    processes may open the same file (busy_timeout waits for their locks). Every statement is
    parameterised and autocommitted.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0):
        path = Path(path)
        if path.is_dir():
            raise GenAdapterError(f"database {path} is a directory")
        if not path.parent.is_dir():
            raise GenAdapterError(f"directory {path.parent} does not exist")
        self.path = path
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise GenAdapterError(f"cannot open database {path}: {exc}") from exc
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise GenAdapterError(f"database {path} cannot use WAL mode (journal_mode={mode})")
            self._db.execute("PRAGMA synchronous=FULL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise GenAdapterError(f"database {path} has schema {version}; this genadapter knows {SCHEMA_VERSION}")
            self._db.execute(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # an int constant, not user input
        except sqlite3.Error as exc:
            self._db.close()
            raise GenAdapterError(f"{path} is not a usable SQLite database: {exc}") from exc
        except GenAdapterError:
            self._db.close()
            raise

    @staticmethod
    def _record(row: tuple) -> ContextRecord:
        return ContextRecord(*row)

    def get(self, context_id: str) -> StoredContext | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS}, state FROM contexts WHERE id = ?", (context_id,)).fetchone()
        return StoredContext(self._record(row[:-1]), bytes(row[-1])) if row else None

    def get_meta(self, context_id: str) -> ContextRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM contexts WHERE id = ?", (context_id,)).fetchone()
        return self._record(row) if row else None

    def put(self, context_id: str, state: ContextState, expected_version: int | None) -> ContextRecord:
        data = state.to_bytes()
        digest = hashlib.sha256(data).hexdigest()
        now = time.time()
        fields = (state.num_tokens, state.nbytes, state.generator_fingerprint, state.base_model, digest)
        with self._lock:
            if expected_version is None:
                try:
                    self._db.execute(
                        f"INSERT INTO contexts ({_COLUMNS}, state) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (context_id, now, now, *fields, data),
                    )
                except sqlite3.IntegrityError as exc:
                    raise VersionConflict(f"context {context_id} already exists") from exc
                created = now
            else:
                rows = self._db.execute(
                    "UPDATE contexts SET version = version + 1, updated = ?, num_tokens = ?, nbytes = ?, "
                    "generator_fingerprint = ?, base_model = ?, sha256 = ?, state = ? "
                    "WHERE id = ? AND version = ? RETURNING created",
                    (now, *fields, data, context_id, expected_version),
                ).fetchall()  # fetching all rows completes (and so commits) the statement
                if not rows:
                    exists = self._db.execute("SELECT 1 FROM contexts WHERE id = ?", (context_id,)).fetchone()
                    if exists is None:
                        raise NotFound(f"no context with id {context_id}")
                    raise VersionConflict(f"context {context_id} was changed by another request")
                created = rows[0][0]
        version = 1 if expected_version is None else expected_version + 1
        return ContextRecord(context_id, version, created, now, *fields)

    def delete(self, context_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM contexts WHERE id = ?", (context_id,)).rowcount == 1

    def list(self, limit: int = 100, offset: int = 0) -> list[ContextRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM contexts ORDER BY created, id LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
        return [self._record(r) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
