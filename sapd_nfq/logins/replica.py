"""The daemon's login store: an in-memory replica of a backend, so that the
packet path never waits on a disk or a network.

`ReplicaLoginStore` is what the daemon hands its engine. `get`, `entries` and
`is_logged_in` answer from a dict (it is a `MemoryLoginStore`) and do no I/O;
`add` and `remove` change the dict at once and queue the write. One
background thread owns the backend: it opens it (and opens it again after
any failure, with backoff), loads the whole table, writes the queued changes,
and keeps the dict fresh from the backend's change feed (Redis keyspace
notifications, SQLite's data_version), loading the whole table again
whenever the feed cannot say what changed.

While the backend is out, decisions use what memory holds: logins learned
here are kept and written when it returns; what other writers do meanwhile
(another gateway's logins, `auth del`) is seen only then. A login the backend
never had and this gateway never learned cannot appear. The loss and the
return are logged once each, not per packet.

Threads: the thread never holds the lock while it does I/O; the lock only
keeps the dict and the queue of writes consistent with each other. Readers
take no lock: a reload swaps in a whole new dict, single keys change in
place (atomic under the GIL), and `entries` copies the values first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from ..engine.logins import EXACT, Login, LoginScope, LoginStore, MemoryLoginStore, StoreError, address_order, renewed

#: changes not yet written; beyond it the oldest is dropped (and counted)
MAX_PENDING = 10_000
#: seconds between attempts to reopen a failed backend, doubling up to the second
BACKOFF = (0.25, 5.0)
#: seconds between reloads of the whole table while following a feed, for
#: what no feed reports (a FLUSHALL, a message lost with a connection)
RELOAD_INTERVAL = 300.0
#: seconds the thread waits on its feed at most (an SQLite file is looked at
#: after each wait)
WAIT = 1.0
#: seconds `close` waits for the last writes
CLOSE_TIMEOUT = 5.0

#: a queued change: the login to write, or None to remove the address
Change = Login | None
_GONE = object()  # no pending change (a removal's change is None)


class ChangeFeed(Protocol):
    """What a backend reports about changes made by other writers."""

    #: how it follows the backend, for the log and `status`
    mode: str

    def wait(self, timeout: float, wake: threading.Event) -> Iterable[str] | None:
        """Block up to `timeout` s, or until `wake` is set; the addresses that
        changed (maybe none), or None if the whole table must be read again.
        Raises StoreError."""
        ...

    def close(self) -> None:
        ...


class Followed(LoginStore, Protocol):
    """A backend that can report changes: the SQLite and Redis stores."""

    def changes(self) -> ChangeFeed:
        """Start following; changes from then on are reported. Raises StoreError."""
        ...


class ReplicaLoginStore(MemoryLoginStore):
    """The logins of `open_backend()`'s store, held in memory.

    `name` says which store in log lines (no password). `start()` launches
    the thread; `close()` writes what it can and stops it.
    """

    def __init__(self, open_backend: Callable[[], Followed], name: str, log: logging.Logger,
                 max_pending: int = MAX_PENDING, scope: LoginScope = EXACT) -> None:
        super().__init__(scope)
        self.name = name
        self._open_backend = open_backend
        self._log = log
        self._max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Change] = OrderedDict()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._tried = threading.Event()
        self._thread: threading.Thread | None = None
        self._purge_due = False
        self._reload_asked = 0
        self._reloaded = 0
        self._down_since: float | None = None
        self._delay = BACKOFF[0]
        # for status
        self.connected = False
        self.mode: str | None = None
        self.write_errors = 0
        self.dropped_writes = 0
        self.last_sync: float | None = None
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"ReplicaLoginStore({self.name!r})"

    # -- the engine's side: memory only ----------------------------------------

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        with self._lock:
            login = super().add(address, user, now, ttl, source)
            self._queue(login.address, login)
        return login

    def remove(self, address: str) -> bool:
        key = self.scope.key(address)
        with self._lock:
            held = super().remove(key)
            self._queue(key, None)
        return held

    def entries(self, now: float) -> list[Login]:
        held = list(self._logins.values())  # one atomic copy: the thread may change the dict
        return sorted((x for x in held if x.expires > now), key=address_order)

    def purge(self, now: float) -> int:
        """Drop expired logins from memory now, and from the backend soon."""
        with self._lock:
            purged = super().purge(now)
        self._purge_due = True
        self._wake.set()
        return purged

    def _queue(self, address: str, change: Change) -> None:
        # Under the lock. A newer change to an address replaces its pending one.
        if address not in self._pending and len(self._pending) >= self._max_pending:
            self._pending.popitem(last=False)
            self.dropped_writes += 1
        self._pending[address] = change
        self._pending.move_to_end(address)
        self._wake.set()

    # -- the daemon's side --------------------------------------------------

    def start(self, wait: float = 10.0) -> None:
        """Start the thread; return once its first attempt to open and load
        the backend has succeeded or failed, or after `wait` seconds."""
        self._thread = threading.Thread(target=self._run, name="login-store", daemon=True)
        self._thread.start()
        self._tried.wait(wait)

    def close(self) -> None:
        """Write what is pending if the backend is there, then stop."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(CLOSE_TIMEOUT)
        if self._pending:
            self._log.warning("login store %s: %d changes not written", self.name, len(self._pending))
        super().close()

    def request_reload(self) -> int:
        """Ask for the whole table to be read again; returns a ticket that
        `stats()["reloaded"]` reaches once it has been."""
        with self._lock:
            self._reload_asked += 1
            ticket = self._reload_asked
        self._wake.set()
        return ticket

    def stats(self) -> dict[str, object]:
        return {
            "backend": self.name,
            "mode": self.mode,
            "connected": self.connected,
            "pending_writes": len(self._pending),
            "write_errors": self.write_errors,
            "dropped_writes": self.dropped_writes,
            "last_sync": self.last_sync,
            "last_error": self.last_error,
            "reloaded": self._reloaded,
        }

    # -- the thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            backend: Followed | None = None
            feed: ChangeFeed | None = None
            try:
                backend = self._open_backend()
                feed = backend.changes()
                self._reload(backend)
                self._tried.set()
                self._follow(backend, feed)
            except StoreError as exc:
                self._lost(str(exc))
            except Exception as exc:  # a bug must not end the thread: memory would go stale
                self._log.exception("login store %s: unexpected failure", self.name)
                self._lost(f"unexpected failure: {exc!r}")
            finally:
                self._tried.set()
                for thing in (feed, backend):
                    if thing is not None:
                        try:
                            thing.close()
                        except Exception:  # closing a broken connection may fail too
                            pass
            self._stopping.wait(self._delay)
            self._delay = min(self._delay * 2, BACKOFF[1])

    def _follow(self, backend: Followed, feed: ChangeFeed) -> None:
        """Write, read, repeat; returns when stopping, raises StoreError."""
        if self.mode is None:
            self._log.info("login store %s: %d logins loaded, %s", self.name, len(self._logins),
                           feed.mode)
        elif feed.mode != self.mode:
            self._log.warning("login store %s: now %s", self.name, feed.mode)
        self.mode = feed.mode
        next_reload = time.monotonic() + RELOAD_INTERVAL
        while True:
            self._wake.clear()
            if self._reload_asked > self._reloaded or time.monotonic() >= next_reload:
                next_reload = time.monotonic() + RELOAD_INTERVAL
                self._reload(backend)
            written = self._flush(backend)
            self._delay = BACKOFF[0]  # read and written: a whole cycle went through
            if self._down_since is not None:
                self._back(written)
            if self._purge_due:
                self._purge_due = False
                backend.purge(time.time())
            if self._stopping.is_set():
                return
            changed = feed.wait(WAIT, self._wake)
            self.last_sync = time.time()  # the feed answered: memory is in step
            if changed is None:
                self._reload(backend)
            else:
                for address in set(changed):
                    self._apply(address, backend.get(address, time.time()))

    def _reload(self, backend: Followed) -> None:
        """Read the whole table and swap it in, with the pending changes on top."""
        ticket = self._reload_asked
        table = {x.address: x for x in backend.entries(time.time())}
        with self._lock:
            for address, change in self._pending.items():
                if change is None:
                    table.pop(address, None)
                else:
                    table[address] = renewed(table.get(address), change)
            self._logins = table
        self._reloaded = max(self._reloaded, ticket)
        self.last_sync = time.time()
        self.connected = True

    def _apply(self, address: str, login: Login | None) -> None:
        """What another writer left for `address`, unless a change of ours is pending:
        then ours is written next, and its own notice brings the stored result."""
        with self._lock:
            if address in self._pending:
                return
            if login is None:
                self._logins.pop(address, None)
            else:
                self._logins[address] = login

    def _flush(self, backend: Followed) -> int:
        """Write the pending changes, oldest first; how many were written."""
        written = 0
        while True:
            with self._lock:
                if not self._pending:
                    return written
                address, change = next(iter(self._pending.items()))
            now = time.time()
            stored: Login | None = None
            try:
                if change is None:
                    backend.remove(address)
                elif change.expires > now:  # an expired one has nothing left to write
                    stored = backend.add(address, change.user, now, change.expires - now,
                                         change.source)
            except StoreError:
                self.write_errors += 1
                with self._lock:  # the others get their turn before this one is retried
                    if self._pending.get(address, _GONE) is change:
                        self._pending.move_to_end(address)
                raise
            written += 1
            with self._lock:
                if self._pending.get(address, _GONE) is change:  # not replaced meanwhile
                    del self._pending[address]
                    if stored is not None:
                        self._logins[address] = stored

    def _lost(self, error: str) -> None:
        self.connected = False
        self.last_error = error
        # a backend's errors start with its name: said once is enough
        error = error.removeprefix(f"{self.name}: ").rstrip(".")
        if self._down_since is None:
            self._down_since = time.monotonic()
            self._log.error("login store %s unavailable: %s; deciding from memory (%d logins), "
                            "keeping new logins there until it is back",
                            self.name, error, len(self._logins))
        else:
            self._log.debug("login store %s still unavailable: %s", self.name, error)

    def _back(self, written: int) -> None:
        assert self._down_since is not None
        self._log.warning("login store %s is back after %.1f s: %d pending changes written, "
                          "%d logins held",
                          self.name, time.monotonic() - self._down_since, written, len(self._logins))
        self._down_since = None
        self.last_error = None
