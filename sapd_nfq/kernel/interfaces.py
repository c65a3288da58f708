"""The host's network interfaces, as the rules installer needs them (pyroute2).

An interface name ends up inside an iptables-restore transaction, so a name is
checked for syntax before anything else: a newline or a leading `-` in a name
would otherwise become a rule or an option of its own. `lo` is refused in every
spelling, because queueing loopback traffic loops (and the daemon's own
injected packets to a local server go over it).

It also tells what the rules can see on this host: bridges, their ports,
netfilter calls, forwarding. A rule set that cannot see the traffic it is
meant to judge is worse than none: the gate runs, `status` looks fine, and
relays pass unjudged. `read_host` reads the host's links and sysctls into a
`HostNet`, and `blind_spots` names every way the configured `interfaces` and
`mode` would leave the rules blind, each with its fix; `up` and `run` refuse
to start on any, and `status` reports them while running. A child process
does the reading, so pyroute2 (about 14 MB once imported) never stays in the
daemon's memory.

How bridged traffic meets iptables, which the checks follow:
- A packet bridged between two ports enters iptables only through
  br_netfilter, and only when `net.bridge.bridge-nf-call-iptables` (for IPv6
  `-ip6tables`) is 1 in the host's network namespace or the bridge's own
  `nf_call_iptables` option is set. Otherwise it never reaches a hook.
- It enters with the bridge as its interface (`-i br0`); the port is only
  in the physdev match (`--physdev-in c1`) and in the queue binding's
  `physindev`. So a client port is matched as a port, never as `-i`.
- A port of any other master (a bond, a team, an Open vSwitch) is never seen
  by iptables under its own name at all.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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


def _iproute(netns: str | None) -> Any:
    """An IPRoute here, or in the named network namespace. Debian 12's pyroute2 (0.7.2)
    takes no `netns` argument, so it is given only for a namespace (the lab's), and
    its messages give attributes by get_attr alone, as read here."""
    from pyroute2 import IPRoute  # netlink only where it is used
    return IPRoute() if netns is None else IPRoute(netns=netns)


def list_interfaces(netns: str | None = None) -> list[str]:
    """Names of the interfaces present (in the named network namespace), by index."""
    with _iproute(netns) as ipr:
        links = sorted(ipr.get_links(), key=lambda link: link["index"])
        return [link.get_attr("IFLA_IFNAME") for link in links]


def default_route_interfaces(netns: str | None = None) -> list[str]:
    """Interfaces that carry a default route of the main table, IPv4 then IPv6, no repeats.

    A gateway's outside interface, or a server's only uplink: the usual answer
    for `interfaces` when the administrator has not named one.
    """
    with _iproute(netns) as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
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
    oif = route.get_attr("RTA_OIF")
    if oif is not None:
        return [oif]
    return [hop["oif"] for hop in route.get_attr("RTA_MULTIPATH") or () if hop.get("oif")]


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
    in-interface indexes the queue binding gives: the logical one (0: sent
    by this host) and, for a bridged packet, the bridge port (0: none).

    Mode "input" with no `interfaces` counts every interface but lo; else
    the names decide (`prefix+` as iptables reads it): a packet is from the
    client side if its port or its interface is named, so a named port
    counts only its own packets and a named bridge all of its ports'. Names
    are looked up by index once and kept: `forget()` drops them
    (interfaces come and go).
    """

    def __init__(self, mode: str, names: Iterable[str]) -> None:
        names = tuple(names)
        self._every = mode == "input" and not names
        self._exact = frozenset(n for n in names if not n.endswith("+"))
        self._prefixes = tuple(n[:-1] for n in names if n.endswith("+"))
        self._known: dict[int, bool] = {}

    def __call__(self, index: int, port: int = 0) -> bool:
        known = self._known  # every packet asks: the names already looked up answer first
        if port and (known[port] if port in known else self._named(port)):
            return True
        return known[index] if index in known else self._named(index)

    def _named(self, index: int) -> bool:
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


# --- What the rules can see: bridges, their ports, netfilter calls, forwarding ------

#: masters whose ports iptables still sees by their own name (`-i port`)
_ROUTED_MASTERS = frozenset({"vrf"})
_FAMILIES = (("IPv4", "iptables"), ("IPv6", "ip6tables"))


@dataclass(frozen=True)
class Link:
    """One interface: its kind ("bridge", "veth", ...; None if the kernel says
    none), the interface it is enslaved to, and for a bridge its own
    nf_call_iptables / nf_call_ip6tables options."""

    name: str
    kind: str | None = None
    master: str | None = None
    nf_call: tuple[bool, bool] = (False, False)


@dataclass(frozen=True)
class HostNet:
    """The host's links by name, IP forwarding (IPv4, IPv6), and the
    bridge-nf-call sysctls (IPv4, IPv6); `bridge_nf` None: br_netfilter is
    not loaded, so no bridged packet reaches iptables."""

    links: Mapping[str, Link] = field(default_factory=dict)
    forwarding: tuple[bool, bool] = (False, False)
    bridge_nf: tuple[bool, bool] | None = None

    def bridge_of(self, name: str) -> str | None:
        """The bridge `name` is a port of, if it is one."""
        link = self.links.get(name)
        if link is None or link.master is None:
            return None
        master = self.links.get(link.master)
        return link.master if master is not None and master.kind == "bridge" else None

    def ports(self, bridge: str) -> list[str]:
        return sorted(n for n, link in self.links.items() if link.master == bridge)

    def bridge_ports(self, names: Iterable[str]) -> tuple[str, ...]:
        """The names (exact ones, not prefixes) that are ports of a bridge."""
        return tuple(n for n in names if not n.endswith("+") and self.bridge_of(n) is not None)

    def nf_calls(self, bridge: str) -> tuple[bool, bool]:
        """Whether bridged IPv4 and IPv6 packets of `bridge` reach iptables."""
        if self.bridge_nf is None:
            return (False, False)
        own = self.links[bridge].nf_call
        return (self.bridge_nf[0] or own[0], self.bridge_nf[1] or own[1])


def _named(link: str, names: Iterable[str]) -> bool:
    return any(link == n or (n.endswith("+") and link.startswith(n[:-1])) for n in names)


def blind_spots(mode: str, names: Iterable[str], host: HostNet) -> list[str]:
    """Every way the rules for `mode` and client interfaces `names` would not
    see the mail they are meant to judge, each naming its fix; [] when none."""
    names = tuple(names)
    problems: list[str] = []
    for name in names:
        if name.endswith("+"):
            ports = [n for n in host.links if _named(n, [name]) and host.bridge_of(n)]
            if ports:
                problems.append(
                    f"interfaces: {name!r} takes in bridge ports ({', '.join(sorted(ports))}), "
                    "whose traffic iptables sees only by port: name the ports one by one")
            continue
        link = host.links.get(name)
        if link is None or link.master is None:
            continue
        master = host.links.get(link.master)
        master_kind = master.kind if master is not None else None
        if master_kind == "bridge":
            problems += _bridge_port(mode, name, link.master, names, host)
        elif master_kind not in _ROUTED_MASTERS:
            problems.append(
                f"interfaces: {name!r} is enslaved to {link.master!r} ({master_kind or 'unknown kind'}): "
                f"its packets reach iptables as {link.master!r}'s or not at all; name {link.master!r}")
    bridges = [n for n in names if host.links.get(n, Link(n)).kind == "bridge"]
    for bridge in bridges:
        both = [p for p in host.ports(bridge) if p in names]
        if both:
            problems.append(
                f"interfaces: both the bridge {bridge!r} and its port(s) {', '.join(both)} are named: "
                f"name the ports clients come in on (traffic bridged between ports is matched by "
                f"port), or the bridge alone (all its ports on the client side)")
    if mode == "forward":
        problems += _forward_fits(names, host)
    return list(dict.fromkeys(problems))  # two ports of one bridge may share a problem


def _bridge_port(mode: str, name: str, bridge: str, names: tuple[str, ...],
                 host: HostNet) -> list[str]:
    if mode == "input":
        return [f"interfaces: {name!r} is a port of the bridge {bridge!r}, and this host's own "
                f"mail comes in as {bridge!r}: in mode 'input' name {bridge!r}"]
    problems = []
    for (label, tool), on in zip(_FAMILIES, host.nf_calls(bridge)):
        if on:
            continue
        if host.bridge_nf is None:
            fix = "load br_netfilter (`modprobe br_netfilter`)"
        else:
            fix = (f"set net.bridge.bridge-nf-call-{tool}=1 "
                   f"(`sysctl -w net.bridge.bridge-nf-call-{tool}=1`), or "
                   f"`ip link set {bridge} type bridge nf_call_{tool} 1`")
        problems.append(f"interfaces: {name!r} is a port of the bridge {bridge!r}, whose bridged "
                        f"{label} traffic never reaches iptables: {fix}")
    if all(port in names for port in host.ports(bridge)):
        problems.append(f"interfaces: every port of the bridge {bridge!r} is named as a client "
                        "port, so no mail server is behind it: name only the ports clients "
                        "come in on")
    return problems


def _forward_fits(names: tuple[str, ...], host: HostNet) -> list[str]:
    """Mode "forward" routes between client interfaces and the rest: for the
    names that are not bridge ports, the host must forward and have some other
    interface to forward to."""
    routed = [n for n in names if n.endswith("+") or host.bridge_of(n) is None]
    if not routed:
        return []
    problems = []
    if host.links and not any(host.forwarding):
        problems.append(
            f"mode 'forward', but this host forwards neither IPv4 nor IPv6, so no mail is "
            f"routed through {', '.join(routed)}: if the mail server runs here, set "
            "mode = \"input\"; if it is behind this host, turn forwarding on "
            "(net.ipv4.ip_forward=1, net.ipv6.conf.all.forwarding=1)")
    client_side = set(routed)
    for bridge in routed:
        client_side.update(host.ports(bridge))
    others = [n for n, link in host.links.items()
              if n != "lo" and link.master is None and not _named(n, client_side)]
    if host.links and not others:
        problems.append(
            f"mode 'forward', but every interface of this host is on the client side "
            f"({', '.join(sorted(client_side))}), so there is no server side to route to: "
            "if clients and servers share a bridge, name the bridge ports clients come in on")
    return problems


def refuse_blind(mode: str, names: Iterable[str], host: HostNet | None = None) -> HostNet:
    """Read the host (unless given) and raise ConfigError listing every blind spot."""
    host = read_host() if host is None else host
    problems = blind_spots(mode, names, host)
    if problems:
        raise ConfigError("the rules would not see the mail they are meant to judge:\n  "
                          + "\n  ".join(problems))
    return host


# --- Reading the host (I/O) ---------------------------------------------------------

_SYSCTL = Path("/proc/sys/net")


def _flag(path: Path) -> bool | None:
    try:
        return path.read_text().strip() != "0"
    except OSError:
        return None


#: how long the child reading the host may take (it imports pyroute2 on a slow machine)
READ_TIMEOUT = 60.0


def read_host(sysctl: Path = _SYSCTL) -> HostNet:
    """The links of this network namespace and its sysctls, read by a child
    process (`_read_here`), which runs in the caller's network namespace."""
    try:
        done = subprocess.run([sys.executable, "-m", __name__, str(sysctl)], capture_output=True,
                              text=True, timeout=READ_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ConfigError(f"cannot read the host's interfaces: {exc}") from None
    if done.returncode:
        raise ConfigError(f"cannot read the host's interfaces: {done.stderr.strip()[-500:]}")
    found = json.loads(done.stdout)
    return HostNet(
        links={name: Link(name, kind, master, (nf4, nf6))
               for name, (kind, master, (nf4, nf6)) in found["links"].items()},
        forwarding=(found["forwarding"][0], found["forwarding"][1]),
        bridge_nf=None if found["bridge_nf"] is None else (found["bridge_nf"][0], found["bridge_nf"][1]))


def _read_here(sysctl: Path) -> HostNet:
    """The links of this network namespace and its sysctls.

    /proc/sys/net answers for the namespace of the task that reads it, which
    is the one whose traffic the rules see."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        found = ipr.get_links()
    by_index = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in found}
    links = {}
    for msg in found:
        name = msg.get_attr("IFLA_IFNAME")
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
        nf_call = (False, False)
        if kind == "bridge" and data is not None:
            nf_call = (bool(data.get_attr("IFLA_BR_NF_CALL_IPTABLES")),
                       bool(data.get_attr("IFLA_BR_NF_CALL_IP6TABLES")))
        master = msg.get_attr("IFLA_MASTER")
        links[name] = Link(name, kind, by_index.get(master) if master else None, nf_call)
    calls = (_flag(sysctl / "bridge" / "bridge-nf-call-iptables"),
             _flag(sysctl / "bridge" / "bridge-nf-call-ip6tables"))
    return HostNet(
        links=links,
        forwarding=(bool(_flag(sysctl / "ipv4" / "ip_forward")),
                    bool(_flag(sysctl / "ipv6" / "conf" / "all" / "forwarding"))),
        bridge_nf=None if calls[0] is None else (bool(calls[0]), bool(calls[1])),
    )


if __name__ == "__main__":  # read_host's child: the host, as JSON on stdout
    host = _read_here(Path(sys.argv[1]))
    json.dump({"links": {name: [link.kind, link.master, list(link.nf_call)]
                         for name, link in host.links.items()},
               "forwarding": list(host.forwarding),
               "bridge_nf": None if host.bridge_nf is None else list(host.bridge_nf)}, sys.stdout)
