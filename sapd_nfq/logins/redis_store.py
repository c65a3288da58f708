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

`changes()` follows the table for the daemon's replica (logins/replica.py):
keyspace notifications for the login keys, which it turns on with CONFIG SET
if the server allows (`notify-keyspace-events` must hold K, g, h, x and e);
where CONFIG is refused it falls back to reading the whole table every
POLL_INTERVAL seconds, and says so.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.typing import EncodableT, FieldT

from ..engine.logins import EXACT, Login, LoginScope, LoginStore, StoreError, address_order, new_login, renewed

T = TypeVar("T")

PREFIX = "sapd-nfq:login:"
SCHEMES = ("redis", "rediss", "unix")
TIMEOUT = 2.0  # seconds a command may take; only the replica's thread and the CLI wait
#: keyspace notifications followed: K the keyspace channels, g generic commands
#: (DEL, EXPIRE), h hash commands (HSET), x expiry, e eviction
NOTIFY = "Kghxe"
_ALL_CLASSES = "g$lshzxetd"  # what "A" stands for in notify-keyspace-events
HEALTH_INTERVAL = 1.0  # seconds between PINGs while following: a black hole shows as a timeout
POLL_INTERVAL = 5.0  # seconds between reads of the whole table without notifications
_SLICE = 0.05  # seconds a wait blocks on the subscription before looking at its wake event


def redacted(url: str) -> str:
    """The URL without its password, fit for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisLoginStore(LoginStore):
    def __init__(self, url: str, scope: LoginScope = EXACT) -> None:
        self._shown = redacted(url)
        self.scope = scope
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
        new = new_login(self.scope, address, user, now, ttl, source)
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
        address = self.scope.key(address)
        fields = self._call("get", self._redis.hgetall, PREFIX + address)
        login = self._login(address, fields) if fields else None
        return login if login is not None and login.expires > now else None

    def remove(self, address: str) -> bool:
        return bool(self._call("remove", self._redis.delete, PREFIX + self.scope.key(address)))

    def _all(self) -> list[Login]:
        def scan() -> list[Login]:
            keys = list(self._redis.scan_iter(match=PREFIX + "*", count=500))
            found: list[Login] = []
            for start in range(0, len(keys), 500):  # a round trip per 500 keys, not per key
                batch = keys[start:start + 500]
                pipe = self._redis.pipeline(transaction=False)
                for key in batch:
                    pipe.hgetall(key)
                for key, fields in zip(batch, pipe.execute()):
                    login = self._login(key[len(PREFIX):], fields) if fields else None
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

    def changes(self) -> RedisChanges:
        return RedisChanges(self)

    def _enable_notifications(self) -> str | None:
        """Turn on the keyspace notifications NOTIFY needs; None if done, else
        why they cannot be (CONFIG refused: an ACL, a renamed command)."""
        try:
            current = str(self._redis.config_get("notify-keyspace-events").get("notify-keyspace-events") or "")
            covered = set(current) | (set(_ALL_CLASSES) if "A" in current else set())
            missing = "".join(c for c in NOTIFY if c not in covered)
            if missing:
                self._redis.config_set("notify-keyspace-events", current + missing)
        except redis.ResponseError as e:
            return str(e)
        return None


class RedisChanges:
    """The login keys other writers change, for the replica; one connection of
    its own for the subscription.

    Subscribed before the replica reads the table, so nothing falls between
    the two. Every HEALTH_INTERVAL it PINGs the server on the command
    connection: a server that went silent (packets dropped) raises within
    TIMEOUT instead of looking like a quiet table; one that went away closes
    the subscription, which raises at once.
    """

    def __init__(self, store: RedisLoginStore) -> None:
        self._store = store
        self._pubsub: redis.client.PubSub | None = None
        self._next_ping = time.monotonic()
        self._next_poll = time.monotonic() + POLL_INTERVAL
        refused = store._call("enable notifications", store._enable_notifications)
        if refused is not None:
            self.mode = (f"keyspace notifications refused ({refused}): reading the whole table "
                         f"every {POLL_INTERVAL:g} s")
            return
        self.mode = "following keyspace notifications"
        db = store._redis.connection_pool.connection_kwargs.get("db") or 0
        self._channel = f"__keyspace@{db}__:{PREFIX}"
        self._pubsub = store._redis.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # unannotated before redis-py 8
        try:
            store._call("subscribe", self._subscribe)
        except StoreError:
            self.close()
            raise

    def _subscribe(self) -> None:
        assert self._pubsub is not None
        self._pubsub.psubscribe(self._channel + "*")
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # confirmed: the server now sends every change
            message = self._pubsub.get_message(timeout=TIMEOUT)
            if message is not None and message["type"] == "psubscribe":
                return
        raise redis.TimeoutError("no answer to PSUBSCRIBE")

    def wait(self, timeout: float, wake: threading.Event) -> list[str] | None:
        return self._store._call("follow", self._wait, timeout, wake)

    def _wait(self, timeout: float, wake: threading.Event) -> list[str] | None:
        if time.monotonic() >= self._next_ping:
            self._store._redis.ping()
            self._next_ping = time.monotonic() + HEALTH_INTERVAL
        if self._pubsub is None:
            if wake.wait(max(0.0, min(timeout, self._next_poll - time.monotonic()))):
                return []
            if time.monotonic() < self._next_poll:
                return []
            self._next_poll = time.monotonic() + POLL_INTERVAL
            return None
        deadline = time.monotonic() + timeout
        changed: list[str] = []
        while True:
            # once something arrived, take what else is there without waiting
            message = self._pubsub.get_message(timeout=0.0 if changed else _SLICE)
            if message is None:
                if changed or wake.is_set() or time.monotonic() >= deadline:
                    return changed
            elif message["type"] == "pmessage" and message["channel"].startswith(self._channel):
                changed.append(message["channel"][len(self._channel):])

    def close(self) -> None:
        if self._pubsub is not None:
            self._pubsub.close()
            self._pubsub = None
