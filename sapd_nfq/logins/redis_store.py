"""A login store in Redis, shared by several gateways.

Each gateway that points `state` at the same Redis server sees every login
any of them learned. One hash per address, `sapd-nfq:login:<address>`, with
fields user, source and expires; Redis drops the key when the window
closes (EXPIRE, relative to the adding gateway's clock), so the table cleans
itself. Sync is authenticated by Redis
itself: put the password in the URL (`redis://:PASSWORD@host:6379/0`, or a
`rediss://` URL for TLS; `unix:///run/redis/redis.sock` for a local
socket), and keep the config file root-only. The URL's password never
appears in a repr or an error.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.typing import EncodableT, FieldT

from ..engine.addresses import normalize_ip
from ..engine.logins import Login, LoginStore, StoreError, address_order, new_login, renewed

T = TypeVar("T")

PREFIX = "sapd-nfq:login:"
SCHEMES = ("redis", "rediss", "unix")
TIMEOUT = 2.0  # seconds: a slow Redis must not hold the packet path for long


def redacted(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisLoginStore(LoginStore):
    def __init__(self, url: str) -> None:
        self._shown = redacted(url)
        try:
            self._redis = redis.Redis.from_url(url, socket_timeout=TIMEOUT,
                                               socket_connect_timeout=TIMEOUT,
                                               decode_responses=True)
            self._redis.ping()
        except (redis.RedisError, ValueError) as e:
            raise StoreError(f"{self._shown}: {e}") from None

    def __repr__(self) -> str:
        return f"RedisLoginStore({self._shown!r})"

    def _call(self, what: str, func: Callable[..., T], *args: Any) -> T:
        try:
            return func(*args)
        except redis.RedisError as e:
            raise StoreError(f"{self._shown}: {what}: {e}") from None

    @staticmethod
    def _login(address: str, fields: Mapping[Any, Any]) -> Login | None:
        # decode_responses=True: keys and values arrive as str
        try:
            return Login(address, fields.get("user") or None, float(fields["expires"]),
                         fields.get("source") or "pop3")
        except (KeyError, ValueError):
            return None  # a foreign or half-written key is no login

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        new = new_login(address, user, now, ttl, source)
        key = PREFIX + new.address
        login = renewed(self.get(new.address, now), new)
        fields: dict[FieldT, EncodableT] = {"user": login.user or "", "source": login.source,
                                            "expires": repr(login.expires)}

        def write() -> None:
            pipe = self._redis.pipeline()
            pipe.hset(key, mapping=fields)
            pipe.expire(key, math.ceil(login.expires - now) + 1)
            pipe.execute()

        self._call("add", write)
        return login

    def get(self, address: str, now: float) -> Login | None:
        address = normalize_ip(address)
        fields = self._call("get", self._redis.hgetall, PREFIX + address)
        login = self._login(address, fields) if fields else None
        return login if login is not None and login.expires > now else None

    def remove(self, address: str) -> bool:
        return bool(self._call("remove", self._redis.delete, PREFIX + normalize_ip(address)))

    def _all(self) -> list[Login]:
        def scan() -> list[Login]:
            found: list[Login] = []
            for key in self._redis.scan_iter(match=PREFIX + "*", count=500):
                login = self._login(key[len(PREFIX):], self._redis.hgetall(key))
                if login is not None:
                    found.append(login)
            return found

        return self._call("list", scan)

    def entries(self, now: float) -> list[Login]:
        return sorted((x for x in self._all() if x.expires > now), key=address_order)

    def purge(self, now: float) -> int:
        # Redis expires keys itself; this catches clocks that disagree.
        expired = [x.address for x in self._all() if x.expires <= now]
        if expired:
            self._call("purge", self._redis.delete, *(PREFIX + a for a in expired))
        return len(expired)

    def close(self) -> None:
        self._redis.close()
