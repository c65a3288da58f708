"""Login windows: which client addresses logged in recently, and until when.

A POP3 login (or SMTP AUTH, or an admin's `auth add`) opens a window for the
client address; the policy asks whether the window is open. One entry per
address: a new login replaces user and source, and moves the expiry later but
never earlier, so a short POP3 window cannot cut an admin's long one short
(remove the entry to shorten it).

This module is the interface the engine is handed: `LoginStore`, the
`Login` it returns and the `StoreError` a backend raises, plus
`MemoryLoginStore`, the backend that is a plain dict. The backends that do
I/O (an SQLite file, Redis) live in `sapd_nfq.logins` and implement this
interface; the engine never imports them.

Addresses are normalised (see addresses.py): ::ffff:198.18.0.5 and
198.18.0.5 are one entry. A store's `LoginScope` says what one login opens:
the client's network at a prefix length of each family. Every store keys its
entries by `scope.key(address)`, so a login is recorded, looked up, removed,
listed and expired for that network: at the full length (/32, /128) the key
is the address itself ("198.18.0.5"), at a shorter one the network
("2001:db8:1:2::/64"). Every method raises ValueError for an address that is
not an IP, and StoreError when the backend fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from ipaddress import ip_network
from typing import Protocol, Self

from .addresses import parse_ip
from .errors import SapdError


class StoreError(SapdError):
    """The login store failed (cannot open, locked too long, disk full)."""


@dataclass(frozen=True, slots=True)
class LoginScope:
    """What one login opens: its address's network at these prefix lengths.

    The engine's default is the address alone; the configuration's defaults
    (wiring/config.py) are /32 and /64, where an IPv6 client's privacy
    addresses change (RFC 8981).
    """

    ipv4_prefix: int = 32
    ipv6_prefix: int = 128

    def __post_init__(self) -> None:
        if not (0 <= self.ipv4_prefix <= 32 and 0 <= self.ipv6_prefix <= 128):
            raise ValueError(f"prefix lengths out of range: /{self.ipv4_prefix}, /{self.ipv6_prefix}")

    def key(self, value: str) -> str:
        """The store key of a client address, or of a key (a network) itself."""
        if "/" in value:
            network = ip_network(value, strict=False)
            ip = parse_ip(str(network.network_address))
        else:
            ip = parse_ip(value)
        prefix = self.ipv4_prefix if ip.version == 4 else self.ipv6_prefix
        if prefix == ip.max_prefixlen:
            return str(ip)
        return str(ip_network((ip, prefix), strict=False))


EXACT = LoginScope()


@dataclass(frozen=True, slots=True)
class Login:
    """An open window: `address` may relay until `expires` (epoch seconds).
    `address` is the store's key: an address, or a network (LoginScope).

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


def new_login(scope: LoginScope, address: str, user: str | None, now: float, ttl: float,
              source: str) -> Login:
    if not (math.isfinite(now) and math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"need a finite time and a positive ttl, got now={now!r} ttl={ttl!r}")
    if not source:
        raise ValueError("a login needs a source")
    return Login(scope.key(address), user, float(now + ttl), source)


def renewed(old: Login | None, new: Login) -> Login:
    if old is None or old.expires <= new.expires:
        return new
    return replace(new, expires=old.expires)


def address_order(login: Login) -> tuple[int, int, int]:
    network = ip_network(login.address, strict=False)
    return network.version, int(network.network_address), network.prefixlen


class MemoryLoginStore(LoginStore):
    """Logins in a dict: gone when the process ends."""

    def __init__(self, scope: LoginScope = EXACT) -> None:
        self.scope = scope
        self._logins: dict[str, Login] = {}

    def add(self, address: str, user: str | None, now: float, ttl: float,
            source: str = "pop3") -> Login:
        new = new_login(self.scope, address, user, now, ttl, source)
        login = renewed(self._logins.get(new.address), new)
        self._logins[login.address] = login
        return login

    def get(self, address: str, now: float) -> Login | None:
        login = self._logins.get(self.scope.key(address))
        return login if login is not None and login.expires > now else None

    def remove(self, address: str) -> bool:
        return self._logins.pop(self.scope.key(address), None) is not None

    def entries(self, now: float) -> list[Login]:
        return sorted((x for x in self._logins.values() if x.expires > now), key=address_order)

    def purge(self, now: float) -> int:
        expired = [a for a, x in self._logins.items() if x.expires <= now]
        for address in expired:
            del self._logins[address]
        return len(expired)

    def close(self) -> None:
        self._logins.clear()


