"""The login store: which client addresses logged in recently, and until when.

A POP3 login (or SMTP AUTH, or an admin's `auth add`) opens a window for the
client address; the policy asks whether the window is open. One entry per
address: a new login replaces user and source, and moves the expiry later but
never earlier, so a short POP3 window cannot cut an admin's long one short
(remove the entry to shorten it).

Backends share the small `LoginStore` interface: `MemoryLoginStore` for tests
and throwaway runs, `SQLiteLoginStore` for a file that survives restarts and
is shared by the daemon and the CLI. `open_store(spec)` picks one; a network
backend would be spelled as a URL (`redis://...`) and added to `_OPENERS`.

Addresses are normalised (see addresses.py): ::ffff:198.18.0.5 and
198.18.0.5 are one entry. Every method raises ValueError for an address that
is not an IP, and StoreError when the backend fails.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Self

from .addresses import normalize_ip, parse_ip
from .errors import SapdError

MEMORY = "memory"


class StoreError(SapdError):
    """The login store failed (cannot open, locked too long, disk full)."""


@dataclass(frozen=True, slots=True)
class Login:
    """An open window: `address` may relay until `expires` (epoch seconds).

    `user` is the login name if it was seen, `source` how the login was
    learned ("pop3", "smtp-auth", "manual").
    """

    address: str
    user: str | None
    expires: float
    source: str = "pop3"


class LoginStore(Protocol):
    """What the policy and the CLI need from a backend.

    Backends subclass it to inherit `is_logged_in` and the context manager.
    """

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        """Record a login; returns the entry as stored."""
        ...

    def get(self, address: str, now: float) -> Login | None:
        """The open window for address, or None."""
        ...

    def remove(self, address: str) -> bool:
        """Close the window; False if there was no entry."""
        ...

    def entries(self, now: float) -> list[Login]:
        """The open windows, ordered by address."""
        ...

    def purge(self, now: float) -> int:
        """Delete expired entries; returns how many."""
        ...

    def close(self) -> None:
        ...

    def is_logged_in(self, address: str, now: float) -> bool:
        return self.get(address, now) is not None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_login(address: str, user: str | None, now: float, ttl: float, source: str) -> Login:
    if not (math.isfinite(now) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"need a finite time and a positive ttl, got now={now!r} ttl={ttl!r}")
    if not source:
        raise ValueError("a login needs a source")
    return Login(normalize_ip(address), user, float(now + ttl), source)


def renewed(old: Login | None, new: Login) -> Login:
    if old is None or old.expires <= new.expires:
        return new
    return replace(new, expires=old.expires)


def address_order(login: Login) -> tuple[int, int]:
    ip = parse_ip(login.address)
    return ip.version, int(ip)


class MemoryLoginStore(LoginStore):
    """Logins in a dict: gone when the process ends."""

    def __init__(self) -> None:
        self._logins: dict[str, Login] = {}

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        new = new_login(address, user, now, ttl, source)
        login = renewed(self._logins.get(new.address), new)
        self._logins[login.address] = login
        return login

    def get(self, address: str, now: float) -> Login | None:
        login = self._logins.get(normalize_ip(address))
        return login if login is not None and login.expires > now else None

    def remove(self, address: str) -> bool:
        return self._logins.pop(normalize_ip(address), None) is not None

    def entries(self, now: float) -> list[Login]:
        return sorted((x for x in self._logins.values() if x.expires > now), key=address_order)

    def purge(self, now: float) -> int:
        expired = [a for a, x in self._logins.items() if x.expires <= now]
        for address in expired:
            del self._logins[address]
        return len(expired)

    def close(self) -> None:
        self._logins.clear()


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
    its directory 0700 if missing.
    """

    def __init__(self, path: str | os.PathLike[str], busy_timeout: float = 5.0) -> None:
        self.path = Path(path)
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
        new = new_login(address, user, now, ttl, source)
        with self._errors("cannot add login"), self._transaction():
            old = self._select("address = ?", new.address)
            login = renewed(old[0] if old else None, new)
            self._db.execute(f"INSERT OR REPLACE INTO logins ({_COLUMNS}) VALUES (?, ?, ?, ?)",
                             (login.address, login.user, login.expires, login.source))
        return login

    def get(self, address: str, now: float) -> Login | None:
        key = normalize_ip(address)
        with self._errors("cannot read logins"):
            found = self._select("address = ? AND expires > ?", key, now)
        return found[0] if found else None

    def remove(self, address: str) -> bool:
        key = normalize_ip(address)
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

    def __repr__(self) -> str:
        return f"SQLiteLoginStore({str(self.path)!r})"


REDIS_SCHEMES = ("redis", "rediss", "unix")


def store_kind(spec: str) -> str:
    """"memory", "redis" (a redis://, rediss:// or unix:// URL) or "sqlite"
    (any other spec is a file path).

    Raises ValueError for an empty spec or a URL naming no backend.
    """
    if spec == MEMORY:
        return MEMORY
    if not spec.strip() or "\0" in spec:
        raise ValueError("not a usable file path")
    scheme, sep, _ = spec.partition("://")
    if sep:
        if scheme in REDIS_SCHEMES:
            return "redis"
        raise ValueError(f"no login store backend for {scheme}://")
    return "sqlite"


def _open_redis(spec: str) -> LoginStore:
    try:
        from .logins_redis import RedisLoginStore
    except ImportError:
        raise StoreError("a redis:// store needs the redis package (pip install sapd-nfq[redis])") from None
    return RedisLoginStore(spec)


_OPENERS: dict[str, Callable[[str], LoginStore]] = {
    MEMORY: lambda spec: MemoryLoginStore(),
    "sqlite": SQLiteLoginStore,
    "redis": _open_redis,
}


def open_store(spec: str) -> LoginStore:
    """Open the store a config's `state` names; raises StoreError."""
    try:
        kind = store_kind(spec)
    except ValueError as e:
        raise StoreError(f'{spec!r}: {e}; expected "{MEMORY}", a file path or a redis:// URL') from None
    return _OPENERS[kind](spec)
