"""The SQLite login store: a file that survives restarts, shared by the
daemon and the CLI.

`changes()` follows the file for the daemon's replica (logins/replica.py):
`PRAGMA data_version`, which moves when another connection (the CLI, another
worker) commits, read each time the replica's thread wakes (about once a
second); a file replaced or gone makes the replica open it again.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..engine.logins import EXACT, Login, LoginScope, LoginStore, StoreError, address_order, new_login, renewed

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS logins (
    address TEXT PRIMARY KEY,
    user    TEXT,
    expires REAL NOT NULL,
    source  TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS logins_expires ON logins (expires);
"""
_COLUMNS = "address, user, expires, source"


class SQLiteLoginStore(LoginStore):
    """Logins in an SQLite file, shared by every process that opens it.

    WAL journal, so the CLI can write while the daemon reads. Each write is
    one IMMEDIATE transaction; each read is its own statement in autocommit
    mode and sees every committed write (there is no cache to go stale).
    `synchronous=NORMAL`: a crash of the process loses nothing, a power cut
    may lose the last logins, which users regain by logging in again.
    The file is created mode 0600 (its -wal/-shm files inherit the mode),
    its directory 0700 if missing. Entries are keyed by `scope` (LoginScope).
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = 5.0,
                 scope: LoginScope = EXACT) -> None:
        self.path = Path(path)
        self.scope = scope
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(self.path, timeout=busy_timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            raise StoreError(f"{self.path}: cannot open login store: {e}") from e
        try:
            self._prepare(busy_timeout)
        except BaseException:
            self._db.close()
            raise

    def _prepare(self, busy_timeout: float) -> None:
        with self._errors("cannot open login store"):
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL").fetchall()
            self._db.execute("PRAGMA synchronous = NORMAL")
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchall()[0][0]
                if version > _SCHEMA_VERSION:
                    raise StoreError(f"{self.path}: schema version {version} is newer than "
                                     f"this sapd-nfq understands ({_SCHEMA_VERSION})")
                for statement in _SCHEMA.split(";"):
                    self._db.execute(statement)
                if version != _SCHEMA_VERSION:  # written only once: a full disk can still be read
                    self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: {what}: {e}") from e

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _select(self, where: str, *args: object) -> list[Login]:
        # fetchall() steps each statement to its end, which ends its read
        # snapshot: the next query sees writes made by other processes.
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM logins WHERE {where}", args).fetchall()
        return [Login(*row) for row in rows]

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        new = new_login(self.scope, address, user, now, ttl, source)
        with self._errors("cannot add login"), self._transaction():
            old = self._select("address = ?", new.address)
            login = renewed(old[0] if old else None, new)
            self._db.execute(f"INSERT OR REPLACE INTO logins ({_COLUMNS}) VALUES (?, ?, ?, ?)",
                             (login.address, login.user, login.expires, login.source))
        return login

    def get(self, address: str, now: float) -> Login | None:
        key = self.scope.key(address)
        with self._errors("cannot read logins"):
            found = self._select("address = ? AND expires > ?", key, now)
        return found[0] if found else None

    def remove(self, address: str) -> bool:
        key = self.scope.key(address)
        with self._errors("cannot remove login"), self._transaction():
            return self._db.execute("DELETE FROM logins WHERE address = ?", (key,)).rowcount > 0

    def entries(self, now: float) -> list[Login]:
        with self._errors("cannot read logins"):
            return sorted(self._select("expires > ?", now), key=address_order)

    def purge(self, now: float) -> int:
        with self._errors("cannot purge logins"), self._transaction():
            return self._db.execute("DELETE FROM logins WHERE expires <= ?", (now,)).rowcount

    def close(self) -> None:
        self._db.close()

    def changes(self) -> SQLiteChanges:
        return SQLiteChanges(self)

    def _data_version(self) -> int:
        with self._errors("cannot read logins"):
            return int(self._db.execute("PRAGMA data_version").fetchall()[0][0])

    def _identity(self) -> tuple[int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise StoreError(f"{self.path}: {e}") from None
        return st.st_dev, st.st_ino

    def __repr__(self) -> str:
        return f"SQLiteLoginStore({str(self.path)!r})"


class SQLiteChanges:
    """Whether another connection changed the file. A look costs a stat and a
    PRAGMA, so every wait ends with one; it cannot say which logins changed,
    so a change means a reload."""

    mode = "checking the file's data_version"

    def __init__(self, store: SQLiteLoginStore) -> None:
        self._store = store
        self._identity = store._identity()
        self._version = store._data_version()

    def wait(self, timeout: float, wake: threading.Event) -> list[str] | None:
        wake.wait(timeout)
        if self._store._identity() != self._identity:
            raise StoreError(f"{self._store.path}: replaced by another file")
        version = self._store._data_version()
        if version == self._version:
            return []
        self._version = version
        return None

    def close(self) -> None:
        pass
