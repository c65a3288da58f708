"""Three network namespaces, client -- gw -- server, joined by veth pairs.

Addresses come from the benchmarking range 198.18.0.0/15 and the documentation
range 2001:db8::/32. Two layouts of the same three hosts:

- ROUTED: client and server have subnets of their own and route through gw,
  which forwards both families;
- BRIDGED: gw joins its two links in the bridge br0 (a transparent gateway),
  so client and server share one subnet and reach each other at layer 2;
  br0 holds gw's own address in it (gw still routes what is sent to it).

The client link also carries a pool of extra client addresses
(198.18.3.0/24, 2001:db8:3::/64) for tests that need many senders; on the
bridge the server reaches them on its link.

The namespaces are wired only to each other, so no lab packet can reach any
other network. Nor does a lab process wait on a resolver: `ip netns exec`
gives each namespace its own /etc/hosts and /etc/resolv.conf from
/etc/netns/<name>/ (the lab's hosts, and the machine's own name, which swaks
and Postfix look up; a resolver on the namespace's loopback, where nothing
listens, so any other lookup fails at once instead of timing out).
Everything the lab creates is a named namespace, a process inside one, a file
under its state directory or under /etc/netns/<name>/; `Lab.down()` removes
them all from whatever state it finds, so a crashed run is cleaned up by the
next one.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from socket import AF_INET6
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool

DEFAULT_PREFIX = "sapd"
CLIENT_POOL_SIZE = 16
STOP_TIMEOUT = 5.0  # seconds a process gets between SIGTERM and SIGKILL
TERMINATE_ROUNDS = 3  # passes over a namespace's processes when the lab comes down
ADDRESS_TIMEOUT = 5.0  # seconds for IPv6 addresses to become usable
_IFA_F_TENTATIVE = 0x40

_POOL4 = ipaddress.ip_network("198.18.3.0/24")
_POOL6 = ipaddress.ip_network("2001:db8:3::/64")
_POOL_FIRST = 10  # pool addresses start at .10 / ::a, gw holds .1 / ::1
NETNS_ETC = Path("/etc/netns")  # where `ip netns exec` finds a namespace's own /etc files
LAB_DOMAIN = "lab.example"

# (role, interface) -- (role, interface): the two veth pairs
_LINKS = (
    (("client", "to-gw"), ("gw", "to-client")),
    (("gw", "to-server"), ("server", "to-gw")),
)


@dataclass(frozen=True)
class Layout:
    """How the three hosts are addressed and joined.

    `addresses` per (role, interface), the first address-holding interface
    of a host giving its primary addresses; `bridge`, if set, is the bridge
    gw joins its links in; `onlink` the prefixes the server reaches on its
    own link (the client pool, when there is no router between them).
    """

    name: str
    addresses: dict[tuple[str, str], tuple[str, ...]]
    default_routes: dict[str, tuple[str, str]]
    bridge: str | None = None
    onlink: tuple[str, ...] = ()

    def interfaces(self, role: str) -> tuple[str, ...]:
        return tuple(ifname for r, ifname in self.addresses if r == role)


ROUTED = Layout(
    "routed",
    addresses={
        ("client", "to-gw"): ("198.18.1.2/24", "2001:db8:1::2/64"),
        ("gw", "to-client"): ("198.18.1.1/24", "2001:db8:1::1/64",
                              f"198.18.3.1/{_POOL4.prefixlen}", f"2001:db8:3::1/{_POOL6.prefixlen}"),
        ("gw", "to-server"): ("198.18.2.1/24", "2001:db8:2::1/64"),
        ("server", "to-gw"): ("198.18.2.2/24", "2001:db8:2::2/64"),
    },
    default_routes={"client": ("198.18.1.1", "2001:db8:1::1"),
                    "server": ("198.18.2.1", "2001:db8:2::1")},
)
BRIDGED = Layout(
    "bridged",
    addresses={
        ("client", "to-gw"): ("198.18.1.2/24", "2001:db8:1::2/64"),
        ("gw", "br0"): ("198.18.1.1/24", "2001:db8:1::1/64",
                        f"198.18.3.1/{_POOL4.prefixlen}", f"2001:db8:3::1/{_POOL6.prefixlen}"),
        ("gw", "to-client"): (),
        ("gw", "to-server"): (),
        ("server", "to-gw"): ("198.18.1.3/24", "2001:db8:1::3/64"),
    },
    default_routes={"client": ("198.18.1.1", "2001:db8:1::1"),
                    "server": ("198.18.1.1", "2001:db8:1::1")},
    bridge="br0",
    onlink=(str(_POOL4), str(_POOL6)),
)
# Sysctls set in every namespace before any link exists, so links inherit them:
# no duplicate address detection, or IPv6 addresses stay "tentative" (unbindable)
# for a second or two after the link comes up.
_SYSCTLS_ALL = {"net/ipv6/conf/all/accept_dad": "0", "net/ipv6/conf/default/accept_dad": "0"}
_SYSCTLS_GW = {"net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1"}
# Bridged packets meet iptables (br_netfilter; per namespace, so set in gw's own).
_SYSCTLS_BRIDGE = {"net/bridge/bridge-nf-call-iptables": "1",
                   "net/bridge/bridge-nf-call-ip6tables": "1"}
# Offloads, off unless a test turns them on (`Lab.set_links`): segments are then
# MTU-sized with real checksums, as on a wire, and captures hold what a NIC would
# deliver. On, as a NIC's defaults have it: senders hand down 64 KB TSO packets with
# the TCP checksum left to do, veth passes them on whole, and GRO merges what arrives.
_OFFLOADS = ("tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp6-segmentation", "rx-gro")
DEFAULT_MTU = 1500
#: the most a veth takes
MAX_MTU = 65535


class LabError(RuntimeError):
    """The lab could not be built or a command inside it failed to start."""


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace: its role, name, interfaces and primary addresses.

    For gw the addresses are its client-side ones. `pool_ipv4`/`pool_ipv6` are
    the client's extra addresses (empty for the other hosts).
    """

    role: str
    netns: str
    ifnames: tuple[str, ...]
    ipv4: str
    ipv6: str
    pool_ipv4: tuple[str, ...] = ()
    pool_ipv6: tuple[str, ...] = ()

    def address(self, family: int) -> str:
        return self.ipv6 if family == AF_INET6 else self.ipv4


def _plan(layout: Layout, role: str) -> tuple[tuple[str, ...], str, str]:
    """The host's interfaces and its addresses on the first one that has any
    (for gw: the client side)."""
    ifnames = layout.interfaces(role)
    ipv4, ipv6 = next(layout.addresses[role, i] for i in ifnames if layout.addresses[role, i])[:2]
    return ifnames, ipv4.split("/")[0], ipv6.split("/")[0]


class Lab:
    """The namespace topology; a context manager that builds and removes it::

        with Lab() as lab:
            lab.run("client", ["curl", f"pop3://{lab.server.ipv4}/"])
            with lab.inside("client"):
                sock = socket.create_connection((lab.server.ipv6, 25))
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, state_dir: Path | None = None,
                 pool_size: int = CLIENT_POOL_SIZE, layout: Layout = ROUTED) -> None:
        if not 0 <= pool_size <= 200:
            raise ValueError(f"pool_size {pool_size} out of range 0..200")
        self.prefix = prefix
        self.layout = layout
        self.state_dir = Path(state_dir or f"/run/{prefix}-lab")
        pool4 = tuple(str(_POOL4[_POOL_FIRST + i]) for i in range(pool_size))
        pool6 = tuple(str(_POOL6[_POOL_FIRST + i]) for i in range(pool_size))
        self.client = Host("client", f"{prefix}-client", *_plan(layout, "client"),
                           pool_ipv4=pool4, pool_ipv6=pool6)
        self.gw = Host("gw", f"{prefix}-gw", *_plan(layout, "gw"))
        self.server = Host("server", f"{prefix}-server", *_plan(layout, "server"))
        self.hosts = {h.role: h for h in (self.client, self.gw, self.server)}
        self._procs: list[subprocess.Popen[Any]] = []

    # --- building and removing -------------------------------------------

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the topology from scratch (removing any leftover first)."""
        self.down()
        try:
            self.state_dir.mkdir(parents=True, mode=0o755)
            for host in self.hosts.values():
                netns.create(host.netns)
                self._sysctl(host, _SYSCTLS_ALL)
                self._name_files(host)
            self._sysctl(self.gw, _SYSCTLS_GW)
            for (role_a, if_a), (role_b, if_b) in _LINKS:
                with IPRoute(netns=self.hosts[role_a].netns) as ipr:
                    ipr.link("add", ifname=if_a, kind="veth",
                             peer={"ifname": if_b, "net_ns_fd": self.hosts[role_b].netns})
            if self.layout.bridge is not None:
                self._bridge(self.layout.bridge)
            for host in self.hosts.values():
                self._configure(host)
            for host in self.hosts.values():
                self._route(host)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop everything inside the lab, delete its namespaces and state dir."""
        for proc in self._procs:
            self.stop(proc)
        self._procs.clear()
        names = {h.netns for h in self.hosts.values()}
        present = names & set(netns.listnetns())
        stop_everything_in(present)
        for name in present:
            netns.remove(name)
        for name in names:
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        try:
            NETNS_ETC.rmdir()  # only if no one else keeps files there
        except OSError:
            pass
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def hosts_file(self) -> str:
        """The /etc/hosts every lab namespace sees: the lab's hosts, and this machine's name."""
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
                 f"127.0.1.1\t{socket.gethostname()}"]
        for host in self.hosts.values():
            names = f"{host.role}.{LAB_DOMAIN}" + (f" mail.{LAB_DOMAIN}" if host is self.server
                                                   else "")
            lines += [f"{host.ipv4}\t{names}", f"{host.ipv6}\t{names}"]
        return "\n".join(lines) + "\n"

    def _name_files(self, host: Host) -> None:
        directory = NETNS_ETC / host.netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "hosts").write_text(self.hosts_file())
        # nothing listens there: a lookup the hosts file cannot answer fails at once
        (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")

    def _sysctl(self, host: Host, values: dict[str, str]) -> None:
        # /proc/sys/net belongs to the namespace of the task that opens it.
        with self.inside(host):
            for key, value in values.items():
                Path("/proc/sys", key).write_text(value)

    def _bridge(self, name: str) -> None:
        """gw's links become the ports of bridge `name`, whose traffic meets iptables."""
        self._sysctl(self.gw, _SYSCTLS_BRIDGE)
        with IPRoute(netns=self.gw.netns) as ipr:
            ipr.link("add", ifname=name, kind="bridge")
            bridge = ipr.link_lookup(ifname=name)[0]
            for ifname in self.gw.ifnames:
                if ifname != name:
                    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], master=bridge)

    def _configure(self, host: Host) -> None:
        with IPRoute(netns=host.netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            for ifname in host.ifnames:
                index = ipr.link_lookup(ifname=ifname)[0]
                cidrs = list(self.layout.addresses[host.role, ifname])
                if host is self.client:
                    cidrs += [f"{a}/{_POOL4.prefixlen}" for a in host.pool_ipv4]
                    cidrs += [f"{a}/{_POOL6.prefixlen}" for a in host.pool_ipv6]
                for cidr in cidrs:
                    address, prefixlen = cidr.split("/")
                    ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen))
                ipr.link("set", index=index, state="up")
        self._set_host_links(host, DEFAULT_MTU, offloads=False)

    def set_links(self, mtu: int = DEFAULT_MTU, *, offloads: bool = False) -> None:
        """Every lab link's MTU, and its segmentation and receive offloads on or off."""
        if not 68 <= mtu <= MAX_MTU:
            raise ValueError(f"MTU {mtu} out of range 68..{MAX_MTU}")
        for host in self.hosts.values():
            self._set_host_links(host, mtu, offloads=offloads)

    def _set_host_links(self, host: Host, mtu: int, *, offloads: bool) -> None:
        # a bridge takes its MTU and offloads from its ports
        links = [ifname for ifname in host.ifnames if ifname != self.layout.bridge]
        with IPRoute(netns=host.netns) as ipr:
            for ifname in links:
                ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)
        with self.inside(host):
            ethtool = Ethtool()
        try:
            for ifname in links:
                features = ethtool.get_features(ifname)
                for name in _OFFLOADS:
                    features.features[name].enable = offloads
                ethtool.set_features(ifname, features)
        finally:
            ethtool.close()

    def _route(self, host: Host) -> None:
        with IPRoute(netns=host.netns) as ipr:
            # IPv6 addresses stay tentative until the link has carrier and the kernel's
            # address work has run, even without DAD; until then they cannot be a
            # route's source or bound by a server.
            deadline = time.monotonic() + ADDRESS_TIMEOUT
            while any(_tentative(a) for a in ipr.addr("dump", family=AF_INET6)):
                if time.monotonic() > deadline:
                    raise LabError(f"{host.netns}: IPv6 addresses still tentative")
                time.sleep(0.01)
            if host.role in self.layout.default_routes:
                # The preferred source keeps the pool addresses out of source selection
                # (IPv6 would otherwise pick the longest prefix match, a pool address).
                gw4, gw6 = self.layout.default_routes[host.role]
                ipr.route("add", dst="0.0.0.0/0", gateway=gw4, prefsrc=host.ipv4)
                ipr.route("add", dst="::/0", gateway=gw6, prefsrc=host.ipv6, family=AF_INET6)
            if host is self.server:
                oif = ipr.link_lookup(ifname=host.ifnames[0])[0]
                for prefix in self.layout.onlink:
                    family = AF_INET6 if ":" in prefix else socket.AF_INET
                    ipr.route("add", dst=prefix, oif=oif, family=family)

    # --- working inside ----------------------------------------------------

    def host(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    @contextmanager
    def inside(self, host: Host | str) -> Iterator[None]:
        """Switch the calling thread into the host's namespace.

        Sockets keep the namespace they were created in, so a client library
        that opens its connection inside this block talks from that host::

            with lab.inside("client"):
                pop = poplib.POP3(lab.server.ipv4)
        """
        # The thread's own namespace to return to: pyroute2's pushns saves the
        # process's (/proc/self), on one stack for all threads, so two threads
        # inside at once could come back in each other's namespace.
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            netns.setns(self.host(host).netns, flags=0)
            yield
        finally:
            netns.setns(saved)
            os.close(saved)

    def command(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run inside the host's namespace."""
        return ["ip", "netns", "exec", self.host(host).netns, *argv]

    def run(self, host: Host | str, argv: Sequence[str], *, check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the host and wait for it (subprocess.run keywords)."""
        return subprocess.run(self.command(host, argv), check=check, **kw)

    def spawn(self, host: Host | str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a background process inside the host; `down()` stops it."""
        proc = subprocess.Popen(self.command(host, argv), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> int:
        """Signal a spawned process (and its process group), wait, SIGKILL on timeout."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(STOP_TIMEOUT)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode


def _tentative(msg: Any) -> bool:
    flags = msg.get_attr("IFA_FLAGS")  # the 32-bit flags, when the kernel sends them
    return bool((msg["flags"] if flags is None else flags) & _IFA_F_TENTATIVE)


def stop_everything_in(names: set[str]) -> None:
    """Stop every process inside the named network namespaces (SIGTERM, then SIGKILL)."""
    # again while any are left: a server may fork a child between listing and signal
    for _ in range(TERMINATE_ROUNDS):
        pids = _pids_in(names)
        if not pids:
            return
        _terminate(pids)


def _terminate(pids: list[int]) -> None:
    """SIGTERM the pids, give them STOP_TIMEOUT to exit, then SIGKILL the rest."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if alive(pid)]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _pids_in(names: set[str]) -> list[int]:
    """The pids of every process inside the named network namespaces.

    pyroute2's `netns.ns_pids` lets ESRCH through from a process that exits while /proc is
    read, which a lab being torn down is full of; a process gone is simply not listed.
    """
    inodes = set()
    for name in names:
        try:
            st = os.stat(Path(netns.NETNS_RUN_DIR, name))
        except OSError:
            continue
        inodes.add((st.st_dev, st.st_ino))
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:  # gone (ESRCH, ENOENT) or not ours to read
                continue
            if (st.st_dev, st.st_ino) in inodes:
                pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    """The process runs: it exists and is no zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child of ours that exited stays a zombie until reaped.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
