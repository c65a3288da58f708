"""The relay table: PASS or FAIL for one RCPT.

| sender local | recipient local | client logged in | ruling  | row                    |
|--------------|-----------------|------------------|---------|------------------------|
| any          | yes             | any              | PASS    | ROW_RECIPIENT_LOCAL    |
| yes          | no              | yes              | PASS    | ROW_LOGGED_IN          |
| yes          | no              | no               | FAIL    | ROW_NOT_LOGGED_IN      |
| no           | no              | any              | FAIL    | ROW_NOT_LOCAL          |

(local = found in the virtusertable or in one of the Postfix maps the site
names; logged in = an open window in the login
store, or SMTP AUTH confirmed with 235 on this connection.)

Two lists sit in front of the table:
- a client in `trusted_networks` always relays (ROW_TRUSTED);
- a client in `never_relay_networks` (shared NAT, cloud fetchers polling
  mailboxes) shares its address with strangers, so its address proves
  nothing: it is not trusted even inside a trusted network, and logins
  recorded for the address do not count. SMTP AUTH on the connection still
  counts: it authenticates the connection, not the address.

The login store is asked only when the ruling depends on it; a store that
fails gives FAIL, never PASS.

`may_relay` answers the question without an envelope (trusted, or an open
login window): the test for letting a client start TLS, after which its
envelopes can no longer be read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from .addresses import IPNetwork, find_network, parse_ip, parse_network
from .logins import LoginStore, StoreError

ROW_TRUSTED = "trusted: client in trusted_networks"
ROW_RECIPIENT_LOCAL = "row 1: recipient local"
ROW_LOGGED_IN = "row 2: sender local, recipient not local, client logged in"
ROW_NOT_LOGGED_IN = "row 3: sender local, recipient not local, client not logged in"
ROW_NOT_LOCAL = "row 4: sender not local, recipient not local"

_MAX_SHOWN = 200


@dataclass(frozen=True, slots=True)
class _Ruling:
    row: str
    reason: str
    #: the login name behind a row-2 PASS, when the login recorded one
    user: str | None = None

    def __str__(self) -> str:
        # the label is the class's name: PASS or FAIL
        return f"{type(self).__name__.upper()}  {self.row} ({self.reason})"


@dataclass(frozen=True, slots=True)
class Pass(_Ruling):
    pass


@dataclass(frozen=True, slots=True)
class Fail(_Ruling):
    pass


#: the table's ruling on one RCPT (the packet's fate is verdicts.Verdict)
Ruling = Pass | Fail


def _shown(text: str) -> str:
    """Peer-supplied text made safe for a log line or a reply: printable, bounded."""
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:_MAX_SHOWN])
    return safe + ("..." if len(text) > _MAX_SHOWN else "")


class LocalAddresses(Protocol):
    """A map that says which addresses are local (VirtUserTable, PostfixMap)."""

    def is_local(self, address: str) -> bool: ...
    def local_keys(self) -> frozenset[str]: ...
    def __len__(self) -> int: ...


class AnyOf:
    """Local in any of several maps: the virtusertable and Postfix's maps."""

    __slots__ = ("maps",)

    def __init__(self, maps: Sequence[LocalAddresses]) -> None:
        self.maps = tuple(maps)

    def is_local(self, address: str) -> bool:
        return any(m.is_local(address) for m in self.maps)

    def local_keys(self) -> frozenset[str]:
        return frozenset().union(*(m.local_keys() for m in self.maps))

    def __len__(self) -> int:
        return sum(len(m) for m in self.maps)


def _networks(items: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(parse_network(n) if isinstance(n, str) else n for n in items)


class RelayPolicy:
    """Decides each RCPT. `table` may be swapped for a reloaded one at any time."""

    def __init__(
        self,
        table: LocalAddresses,
        logins: LoginStore,
        trusted_networks: Iterable[str | IPNetwork] = (),
        never_relay_networks: Iterable[str | IPNetwork] = (),
    ) -> None:
        self.table = table
        self.logins = logins
        self.trusted_networks = _networks(trusted_networks)
        self.never_relay_networks = _networks(never_relay_networks)

    def decide(self, client: str, sender: str, recipient: str, now: float,
               authenticated: bool = False) -> Ruling:
        """The ruling on RCPT TO:<recipient> after MAIL FROM:<sender> from client.

        Raises ValueError if client is not an IP address.
        """
        ip = parse_ip(client)
        shared = find_network(ip, self.never_relay_networks)
        if shared is None:
            trusted = find_network(ip, self.trusted_networks)
            if trusted is not None:
                return Pass(ROW_TRUSTED, f"{ip} is in {trusted}")
        if self.table.is_local(recipient):
            return Pass(ROW_RECIPIENT_LOCAL, f"<{_shown(recipient)}> is local")
        if not self.table.is_local(sender):
            return Fail(ROW_NOT_LOCAL,
                        f"neither <{_shown(sender)}> nor <{_shown(recipient)}> is local")
        if authenticated:
            return Pass(ROW_LOGGED_IN, f"SMTP AUTH accepted on this connection from {ip}")
        if shared is not None:
            return Fail(ROW_NOT_LOGGED_IN,
                        f"client {ip} is in never-relay network {shared}: its logins do not count")
        try:
            login = self.logins.get(str(ip), now)
        except StoreError as e:
            return Fail(ROW_NOT_LOGGED_IN, f"login store failed: {e}")
        if login is None:
            return Fail(ROW_NOT_LOGGED_IN, f"no login from {ip} in the window")
        who = _shown(login.user) if login.user else "someone"
        left = max(0, int(login.expires - now))
        return Pass(ROW_LOGGED_IN, f"{who} at {ip} via {login.source}, {left} s left", login.user)

    def may_relay(self, client: str, now: float) -> bool:
        """Trusted, or logged in by address; False in a never-relay network.

        Raises ValueError if client is not an IP address.
        """
        ip = parse_ip(client)
        if find_network(ip, self.never_relay_networks) is not None:
            return False
        if find_network(ip, self.trusted_networks) is not None:
            return True
        try:
            return self.logins.is_logged_in(str(ip), now)
        except StoreError:
            return False
