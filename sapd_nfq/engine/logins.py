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
198.18.0.5 are one entry. Every method raises ValueError for an address that
is not an IP, and StoreError when the backend fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Protocol, Self

from .addresses import normalize_ip, parse_ip
from .errors import SapdError


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


