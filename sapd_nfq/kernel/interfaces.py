"""The host's network interfaces, as the rules installer needs them (pyroute2).

An interface name ends up inside an iptables-restore transaction, so a name is
checked for syntax before anything else: a newline or a leading `-` in a name
would otherwise become a rule or an option of its own. `lo` is refused in every
spelling, because queueing loopback traffic loops (and the daemon's own
injected packets to a local server go over it).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Collection, Iterable
from typing import Any

from sapd_nfq.engine.errors import ConfigError

# Linux allows up to 15 bytes (IFNAMSIZ - 1); iptables adds a trailing `+` to
# mean "every interface whose name starts with this". The character set is
# narrower than the kernel's on purpose: what iptables-restore reads as plain
# text and an administrator reads as a name.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}\+?")
_MAIN_TABLE = 254
_RTN_UNICAST = 1


def check_name(name: str) -> None:
    """Raise ConfigError unless `name` is a usable interface name (or `prefix+`) other than lo."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 15:
        raise ConfigError(
            f"interfaces: {name!r} is not an interface name "
            "(1-15 characters of A-Z a-z 0-9 _ . -, optionally ending in + for a prefix)"
        )
    if name == "lo" or (name.endswith("+") and "lo".startswith(name[:-1])):
        raise ConfigError(
            f"interfaces: {name!r} takes in the loopback interface; "
            "loopback is never queued (queued loopback traffic loops)"
        )


def list_interfaces(netns: str | None = None) -> list[str]:
    """Names of the interfaces present (in the named network namespace), by index."""
    from pyroute2 import IPRoute  # netlink only where it is used
    with IPRoute(netns=netns) as ipr:
        links = sorted(ipr.get_links(), key=lambda link: link["index"])
        return [link.get("ifname") for link in links]


def default_route_interfaces(netns: str | None = None) -> list[str]:
    """Interfaces that carry a default route of the main table, IPv4 then IPv6, no repeats.

    A gateway's outside interface, or a server's only uplink: the usual answer
    for `interfaces` when the administrator has not named one.
    """
    from pyroute2 import IPRoute  # netlink only where it is used
    with IPRoute(netns=netns) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        found: list[str] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.route("dump", family=family):
                if (route["dst_len"] != 0 or route["type"] != _RTN_UNICAST
                        or route.get("table") != _MAIN_TABLE):
                    continue
                for oif in _out_interfaces(route):
                    name = names.get(oif)
                    if name is not None and name not in found:
                        found.append(name)
        return found


def _out_interfaces(route: Any) -> list[int]:
    """The output interface indexes of a route, single-path or multipath."""
    oif = route.get("oif")
    if oif is not None:
        return [oif]
    return [hop["oif"] for hop in route.get("multipath") or () if hop.get("oif")]


def validate(names: Iterable[str], available: Collection[str] | None = None,
             netns: str | None = None) -> None:
    """Raise ConfigError naming the first interface that is malformed, lo, or absent.

    `available` is the set of names to check against (default: the interfaces
    present now). A `prefix+` name is checked for syntax only: it is meant for
    interfaces that come and go (ppp+), so none need exist yet.
    """
    if available is None:
        available = list_interfaces(netns)
    for name in names:
        check_name(name)
        if not name.endswith("+") and name not in available:
            raise ConfigError(
                f"interfaces: no interface named {name!r} "
                f"(present: {', '.join(sorted(available)) or 'none'})"
            )


class ClientSide:
    """Whether a queued packet came in through a client interface, from the
    in-interface index the queue binding gives (0: sent by this host).

    Mode "input" with no `interfaces` counts every interface but lo; else
    the names decide (`prefix+` as iptables reads it). Names are looked up
    by index once and kept: `forget()` drops them (interfaces come and go).
    """

    def __init__(self, mode: str, names: Iterable[str]) -> None:
        names = tuple(names)
        self._every = mode == "input" and not names
        self._exact = frozenset(n for n in names if not n.endswith("+"))
        self._prefixes = tuple(n[:-1] for n in names if n.endswith("+"))
        self._known: dict[int, bool] = {}

    def __call__(self, index: int) -> bool:
        known = self._known.get(index)
        if known is not None:
            return known
        if index == 0:
            return False
        try:
            name = socket.if_indextoname(index)
        except OSError:  # gone already: not a client interface we know
            return False
        if self._every:
            client = name != "lo"
        else:
            client = name in self._exact or name.startswith(self._prefixes)
        self._known[index] = client
        return client

    def forget(self) -> None:
        self._known.clear()

