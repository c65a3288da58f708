"""The login stores: one backend a module, all behind the engine's
`LoginStore` interface (sapd_nfq.engine.logins).

| spec | backend | module |
|---|---|---|
| `"memory"` | a dict, gone when the process ends | `sapd_nfq.engine.logins` |
| a file path | SQLite (WAL), survives restarts, shared with the CLI | `sqlite_store` |
| `redis://`, `rediss://`, `unix://` URL | Redis, one table for several gateways | `redis_store` |

`open_store(spec)` picks one; a backend module is imported only when a spec
names it, so the redis package is needed only where Redis is used.
"""

from __future__ import annotations

from collections.abc import Callable

from ..engine.logins import LoginStore, MemoryLoginStore, StoreError

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


def _open_sqlite(spec: str) -> LoginStore:
    from .sqlite_store import SQLiteLoginStore

    return SQLiteLoginStore(spec)


def _open_redis(spec: str) -> LoginStore:
    try:
        from .redis_store import RedisLoginStore
    except ImportError:
        raise StoreError("a redis:// store needs the redis package (pip install sapd-nfq[redis])") from None
    return RedisLoginStore(spec)


_OPENERS: dict[str, Callable[[str], LoginStore]] = {
    MEMORY: lambda spec: MemoryLoginStore(),
    "sqlite": _open_sqlite,
    "redis": _open_redis,
}


def open_store(spec: str) -> LoginStore:
    """Open the store a config's `state` names; raises StoreError."""
    try:
        kind = store_kind(spec)
    except ValueError as e:
        raise StoreError(f'{spec!r}: {e}; expected "{MEMORY}", a file path or a redis:// URL') from None
    return _OPENERS[kind](spec)
