"""Persistent context states, their ledgers and the API keys, behind a small interface; SQLite implements it.

A context is a server-generated id (uuid4 hex), the state blob (`ContextState.to_bytes`), its metadata and its
owner: the name of the API key that created it. Writes are compare-and-swap on a version number, so concurrent
absorbs of one context never lose an update, whichever process or thread makes them. The ledger lists what each
context absorbed, one item per text, text included (forgetting an item re-absorbs its text and subtracts it); an
item comes and goes in the same transaction as the state write it belongs to. API keys are stored as sha256
digests only. Another database plugs in by implementing `ContextStore`.

Schema 2 (this one) adds owners, ledgers and keys to schema 1, which opens and is migrated in place: its contexts
belong to ANONYMOUS, the owner that every request of a `--no-auth` server acts as, and have empty ledgers (their
texts were never stored, so what they absorbed before the migration cannot be forgotten through the service).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import GenAdapterError
from ..state import ContextState
from .errors import Conflict, NotFound, QuotaExceeded, VersionConflict

_ID = re.compile(r"[0-9a-f]{32}")
_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
SCHEMA_VERSION = 2
ANONYMOUS = "anonymous"  # owner of a --no-auth server's requests and of schema-1 contexts; no key may take the name
KEY_PREFIX = "ga-"


def new_id() -> str:
    return uuid.uuid4().hex


def is_valid_id(value: object) -> bool:
    """Ids are exactly what new_id makes; anything else cannot name a stored context."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def digest(text: str) -> str:
    """sha256 of a text's UTF-8 bytes: how the ledger recognises a text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_digest(key: str) -> str:
    """What the store keeps of an API key (keys are 256 random bits, so a plain sha256 cannot be reversed)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


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
    owner: str  # name of the key that created it


@dataclass(frozen=True)
class StoredContext:
    record: ContextRecord
    data: bytes  # ContextState.to_bytes(half=store.half)

    def state(self) -> ContextState:
        return ContextState.from_bytes(self.data, f"stored context {self.record.id}")


@dataclass(frozen=True)
class LedgerItem:
    """One text a context absorbed; its state holds the sum of its items' states (plus any pre-ledger content)."""

    id: str
    context_id: str
    source: str  # the request that absorbed it: "create", "absorb" or "remember"
    sha256: str  # digest(text)
    num_tokens: int  # tokens of the text's state
    created: float
    text: str

    @classmethod
    def new(cls, context_id: str, source: str, text: str, num_tokens: int) -> LedgerItem:
        return cls(new_id(), context_id, source, digest(text), num_tokens, time.time(), text)

    @property
    def nbytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class KeyRecord:
    name: str
    created: float
    revoked: float | None  # unix seconds, or None while the key works
    max_contexts: int | None  # None: the server's default
    max_bytes: int | None


@dataclass(frozen=True)
class Usage:
    """What an owner stores: contexts, and bytes of their state blobs plus their ledger texts."""

    contexts: int
    nbytes: int


@dataclass(frozen=True)
class Quota:
    max_contexts: int
    max_bytes: int

    def check(self, owner: str, usage: Usage, add_contexts: int = 0, add_bytes: int = 0) -> None:
        """QuotaExceeded if `owner`, holding `usage`, may not add that much; a write that adds nothing always may."""
        if add_contexts > 0 and usage.contexts + add_contexts > self.max_contexts:
            raise QuotaExceeded(
                f"quota exceeded: key {owner!r} has {usage.contexts} contexts and may keep at most "
                f"{self.max_contexts}; delete one first"
            )
        if add_bytes > 0 and usage.nbytes + add_bytes > self.max_bytes:
            raise QuotaExceeded(
                f"quota exceeded: key {owner!r} stores {usage.nbytes} bytes of states and ledger texts, and this "
                f"request adds {add_bytes}: over its limit of {self.max_bytes} bytes"
            )


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the owner name it acts as, and what that owner may store."""

    name: str
    quota: Quota


class ContextStore(ABC):
    """What the service needs from a database. Implementations must be safe to call from many threads."""

    half: bool = False  # states are stored at half precision (ContextState.to_bytes(half=True))

    def as_stored(self, state: ContextState) -> ContextState:
        """The state as `get` will return it once written: what the service caches, so that answers do not change
        when the cache lets it go."""
        return ContextState.from_bytes(state.to_bytes(half=True)) if self.half else state

    @abstractmethod
    def get(self, context_id: str) -> StoredContext | None: ...

    def get_meta(self, context_id: str) -> ContextRecord | None:
        """Metadata only (override when the blob is expensive to fetch)."""
        stored = self.get(context_id)
        return stored.record if stored else None

    @abstractmethod
    def create(
        self,
        context_id: str,
        owner: str,
        state: ContextState,
        item: LedgerItem | None = None,
        quota: Quota | None = None,
    ) -> ContextRecord:
        """Store a new context (the id must be new) with its first ledger item; raises VersionConflict when the
        id exists, QuotaExceeded when the owner may not store it. Returns the record once the write is durable."""

    @abstractmethod
    def update(
        self,
        context_id: str,
        state: ContextState,
        expected_version: int,
        *,
        add: LedgerItem | None = None,
        remove: str | None = None,
        quota: Quota | None = None,
    ) -> ContextRecord:
        """Replace the state if the stored version is expected_version, adding and/or removing a ledger item in
        the same transaction. Raises NotFound, VersionConflict, Conflict (no such item), QuotaExceeded."""

    @abstractmethod
    def delete(self, context_id: str) -> bool:
        """Delete a context and its ledger; True if the context existed."""

    @abstractmethod
    def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[ContextRecord]:
        """The owner's contexts, oldest first."""

    @abstractmethod
    def ledger(self, context_id: str, limit: int = 1000, offset: int = 0) -> list[LedgerItem]:
        """Items in the order they were absorbed."""

    @abstractmethod
    def find_item(self, context_id: str, item_id: str | None = None, sha256: str | None = None) -> LedgerItem | None:
        """The item of this context with that id, or the newest with that text digest."""

    @abstractmethod
    def usage(self, owner: str) -> Usage: ...

    @abstractmethod
    def create_key(self, name: str, max_contexts: int | None = None, max_bytes: int | None = None) -> str:
        """A new API key named `name` (unique forever: the name owns contexts); returns the key, never stored."""

    @abstractmethod
    def revoke_key(self, name: str) -> None: ...

    @abstractmethod
    def keys(self) -> list[KeyRecord]:
        """Every key, revoked ones included, oldest first."""

    @abstractmethod
    def find_key(self, key: str) -> KeyRecord | None: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


_COLUMNS = "id, version, created, updated, num_tokens, nbytes, generator_fingerprint, base_model, sha256, owner"
_ITEM_COLUMNS = "id, context_id, source, sha256, num_tokens, created, text"
_KEY_COLUMNS = "name, created, revoked, max_contexts, max_bytes"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS contexts (
        id TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        num_tokens INTEGER NOT NULL,
        nbytes INTEGER NOT NULL,
        generator_fingerprint TEXT NOT NULL,
        base_model TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        state BLOB NOT NULL,
        owner TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS contexts_by_owner ON contexts (owner, created, id)",
    """CREATE TABLE IF NOT EXISTS ledger (
        id TEXT PRIMARY KEY,
        context_id TEXT NOT NULL,
        source TEXT NOT NULL,
        sha256 TEXT NOT NULL,
        num_tokens INTEGER NOT NULL,
        created REAL NOT NULL,
        nbytes INTEGER NOT NULL,
        text TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS ledger_by_context ON ledger (context_id, sha256)",
    """CREATE TABLE IF NOT EXISTS keys (
        name TEXT PRIMARY KEY,
        digest TEXT NOT NULL UNIQUE,
        created REAL NOT NULL,
        revoked REAL,
        max_contexts INTEGER,
        max_bytes INTEGER
    )""",
)
# What turns a database of schema N into one of schema N + 1, before _SCHEMA creates what is missing.
_MIGRATIONS = {1: (f"ALTER TABLE contexts ADD COLUMN owner TEXT NOT NULL DEFAULT '{ANONYMOUS}'",)}


class SQLiteStore(ContextStore):
    """One SQLite file in WAL mode with synchronous=FULL: a write is on disk before it returns.

    One connection shared by all threads behind a lock (SQLite serialises writers anyway); other processes may open
    the same file (busy_timeout waits for their locks). Every statement is parameterised; every write that changes
    more than one row runs in one IMMEDIATE transaction. `create=False` refuses a file that does not exist yet;
    `half` stores states at half precision (half the bytes; see `ContextState.to_bytes`).
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0, create: bool = True, half: bool = True):
        path = Path(path)
        if path.is_dir():
            raise GenAdapterError(f"database {path} is a directory")
        if not path.parent.is_dir():
            raise GenAdapterError(f"directory {path.parent} does not exist")
        if not create and not path.exists():
            raise GenAdapterError(f"database {path} does not exist")
        self.path = path
        self.half = half
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
            self._migrate()
        except sqlite3.Error as exc:
            self._db.close()
            raise GenAdapterError(f"{path} is not a usable SQLite database: {exc}") from exc
        except GenAdapterError:
            self._db.close()
            raise

    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION in one transaction (processes opening it together migrate it once)."""
        with self._write() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                known = SCHEMA_VERSION
                raise GenAdapterError(f"database {self.path} has schema {version}; this genadapter knows {known}")
            for old in range(version, SCHEMA_VERSION) if version else ():  # 0: a new file, made at SCHEMA_VERSION
                for statement in _MIGRATIONS[old]:
                    db.execute(statement)
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")  # an int constant, not user input

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction (it holds SQLite's write lock from the start): committed, or rolled back on any
        exception, which propagates."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ---- contexts -------------------------------------------------------------------------------

    def get(self, context_id: str) -> StoredContext | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS}, state FROM contexts WHERE id = ?", (context_id,)).fetchone()
        return StoredContext(ContextRecord(*row[:-1]), bytes(row[-1])) if row else None

    def get_meta(self, context_id: str) -> ContextRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM contexts WHERE id = ?", (context_id,)).fetchone()
        return ContextRecord(*row) if row else None

    @staticmethod
    def _fields(state: ContextState, data: bytes) -> tuple:
        blob_digest = hashlib.sha256(data).hexdigest()
        return state.num_tokens, state.nbytes, state.generator_fingerprint, state.base_model, blob_digest

    @staticmethod
    def _usage(db: sqlite3.Connection, owner: str) -> Usage:
        contexts, blobs = db.execute(
            "SELECT count(*), coalesce(sum(length(state)), 0) FROM contexts WHERE owner = ?", (owner,)
        ).fetchone()
        (texts,) = db.execute(
            "SELECT coalesce(sum(ledger.nbytes), 0) FROM ledger JOIN contexts ON contexts.id = ledger.context_id "
            "WHERE contexts.owner = ?",
            (owner,),
        ).fetchone()
        return Usage(contexts, blobs + texts)

    @staticmethod
    def _insert_item(db: sqlite3.Connection, item: LedgerItem) -> None:
        db.execute(
            f"INSERT INTO ledger ({_ITEM_COLUMNS}, nbytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (item.id, item.context_id, item.source, item.sha256, item.num_tokens, item.created, item.text, item.nbytes),
        )

    def create(
        self,
        context_id: str,
        owner: str,
        state: ContextState,
        item: LedgerItem | None = None,
        quota: Quota | None = None,
    ) -> ContextRecord:
        data = state.to_bytes(half=self.half)
        fields = self._fields(state, data)
        now = time.time()
        with self._write() as db:
            if quota is not None:
                added = len(data) + (item.nbytes if item else 0)
                quota.check(owner, self._usage(db, owner), add_contexts=1, add_bytes=added)
            try:
                db.execute(
                    f"INSERT INTO contexts ({_COLUMNS}, state) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (context_id, now, now, *fields, owner, data),
                )
            except sqlite3.IntegrityError as exc:
                raise VersionConflict(f"context {context_id} already exists") from exc
            if item is not None:
                self._insert_item(db, item)
        return ContextRecord(context_id, 1, now, now, *fields, owner)

    def update(
        self,
        context_id: str,
        state: ContextState,
        expected_version: int,
        *,
        add: LedgerItem | None = None,
        remove: str | None = None,
        quota: Quota | None = None,
    ) -> ContextRecord:
        data = state.to_bytes(half=self.half)
        fields = self._fields(state, data)
        now = time.time()
        with self._write() as db:
            row = db.execute(
                "SELECT version, created, owner, length(state) FROM contexts WHERE id = ?", (context_id,)
            ).fetchone()
            if row is None:
                raise NotFound(f"no context with id {context_id}")
            version, created, owner, old_size = row
            if version != expected_version:
                raise VersionConflict(f"context {context_id} was changed by another request")
            if quota is not None:
                added = len(data) - old_size + (add.nbytes if add else 0)
                quota.check(owner, self._usage(db, owner), add_bytes=added)
            if remove is not None:
                gone = db.execute("DELETE FROM ledger WHERE id = ? AND context_id = ?", (remove, context_id)).rowcount
                if gone != 1:
                    raise Conflict(f"context {context_id} has no ledger item {remove!r}")
            if add is not None:
                self._insert_item(db, add)
            db.execute(
                "UPDATE contexts SET version = ?, updated = ?, num_tokens = ?, nbytes = ?, generator_fingerprint = ?, "
                "base_model = ?, sha256 = ?, state = ? WHERE id = ?",
                (version + 1, now, *fields, data, context_id),
            )
        return ContextRecord(context_id, version + 1, created, now, *fields, owner)

    def delete(self, context_id: str) -> bool:
        with self._write() as db:
            db.execute("DELETE FROM ledger WHERE context_id = ?", (context_id,))
            return db.execute("DELETE FROM contexts WHERE id = ?", (context_id,)).rowcount == 1

    def list(self, owner: str, limit: int = 100, offset: int = 0) -> list[ContextRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM contexts WHERE owner = ? ORDER BY created, id LIMIT ? OFFSET ?",
                (owner, limit, offset),
            ).fetchall()
        return [ContextRecord(*r) for r in rows]

    # ---- ledgers and usage ----------------------------------------------------------------------

    def ledger(self, context_id: str, limit: int = 1000, offset: int = 0) -> list[LedgerItem]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM ledger WHERE context_id = ? ORDER BY rowid LIMIT ? OFFSET ?",
                (context_id, limit, offset),
            ).fetchall()
        return [LedgerItem(*r) for r in rows]

    def find_item(self, context_id: str, item_id: str | None = None, sha256: str | None = None) -> LedgerItem | None:
        where, value = ("id = ?", item_id) if item_id is not None else ("sha256 = ?", sha256)
        with self._lock:
            row = self._db.execute(
                f"SELECT {_ITEM_COLUMNS} FROM ledger WHERE context_id = ? AND {where} ORDER BY rowid DESC LIMIT 1",
                (context_id, value),
            ).fetchone()
        return LedgerItem(*row) if row else None

    def usage(self, owner: str) -> Usage:
        with self._lock:
            return self._usage(self._db, owner)

    # ---- keys -----------------------------------------------------------------------------------

    def create_key(self, name: str, max_contexts: int | None = None, max_bytes: int | None = None) -> str:
        if not _KEY_NAME.fullmatch(name):
            raise GenAdapterError(
                f"bad key name {name!r}: use 1 to 64 letters, digits and . _ @ -, starting with a letter or digit"
            )
        if name == ANONYMOUS:
            raise GenAdapterError(f"the key name {ANONYMOUS!r} is reserved for the owner of --no-auth requests")
        if any(limit is not None and limit < 1 for limit in (max_contexts, max_bytes)):
            raise GenAdapterError("a key's quotas must be positive")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._write() as db:
                db.execute(
                    f"INSERT INTO keys ({_KEY_COLUMNS}, digest) VALUES (?, ?, NULL, ?, ?, ?)",
                    (name, time.time(), max_contexts, max_bytes, key_digest(key)),
                )
        except sqlite3.IntegrityError as exc:
            raise GenAdapterError(
                f"a key named {name!r} already exists in {self.path} (a revoked key keeps its name: it owns contexts)"
            ) from exc
        return key

    def revoke_key(self, name: str) -> None:
        with self._write() as db:
            row = db.execute("SELECT revoked FROM keys WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise GenAdapterError(f"no key named {name!r} in {self.path}")
            if row[0] is not None:
                raise GenAdapterError(f"the key {name!r} is already revoked")
            db.execute("UPDATE keys SET revoked = ? WHERE name = ?", (time.time(), name))

    def keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY created, name").fetchall()
        return [KeyRecord(*r) for r in rows]

    def find_key(self, key: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE digest = ?", (key_digest(key),)).fetchone()
        return KeyRecord(*row) if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
