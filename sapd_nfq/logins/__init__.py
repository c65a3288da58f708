"""The login stores: one backend a module, all behind the engine's
`LoginStore` interface (sapd_nfq.engine.logins).

| spec | backend | module |
|---|---|---|
| `"memory"` | a dict, gone when the process ends | `sapd_nfq.engine.logins` |
| a file path | SQLite (WAL), survives restarts, shared with the CLI | `sqlite_store` |
| `redis://`, `rediss://`, `unix://` URL | Redis, one table for several gateways | `redis_store` |

`open_store(spec, scope)` opens one, as the CLI uses it. The daemon takes
`backend(spec, scope)` instead and hands it to a `replica.ReplicaLoginStore`, which
opens it in a thread of its own and keeps its logins in memory. A backend
module is imported only when a spec names it, so the redis package is
needed only where Redis is used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..engine.logins import EXACT, LoginScope, LoginStore, MemoryLoginStore, StoreError

if TYPE_CHECKING:
    from .replica import Followed

MEMORY = "memory"

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


@dataclass(frozen=True)
class Backend:
    """A store not opened yet: `open()` opens it (StoreError if it cannot);
    `name` names it in logs, a URL's password hidden."""

    name: str
    open: Callable[[], Followed]


def _sqlite(spec: str, scope: LoginScope) -> Backend:
    from .sqlite_store import SQLiteLoginStore

    return Backend(spec, lambda: SQLiteLoginStore(spec, scope=scope))


def _redis(spec: str, scope: LoginScope) -> Backend:
    try:
        from .redis_store import RedisLoginStore, redacted
    except ImportError:
        raise StoreError("a redis:// store needs the redis package (pip install sapd-nfq[redis])") from None
    return Backend(redacted(spec), lambda: RedisLoginStore(spec, scope))


_BACKENDS: dict[str, Callable[[str, LoginScope], Backend]] = {"sqlite": _sqlite, "redis": _redis}


def backend(spec: str, scope: LoginScope = EXACT) -> Backend | None:
    """The backend a config's `state` names, its module imported, not yet
    opened, keying its logins by `scope`; None for "memory", which has
    nothing to open. Raises StoreError for a spec no backend takes or a
    driver that is not installed."""
    try:
        kind = store_kind(spec)
    except ValueError as e:
        raise StoreError(f'{spec!r}: {e}; expected "{MEMORY}", a file path or a redis:// URL') from None
    return None if kind == MEMORY else _BACKENDS[kind](spec, scope)


def open_store(spec: str, scope: LoginScope = EXACT) -> LoginStore:
    """Open the store a config's `state` names; raises StoreError."""
    found = backend(spec, scope)
    return MemoryLoginStore(scope) if found is None else found.open()
