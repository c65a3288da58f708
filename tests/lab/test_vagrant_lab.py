"""vagrant/: the lab as VMs, checked without booting them (test_vms_lab.py boots them).

`vagrant validate` checks the Vagrantfile. The provisioning it runs is the
namespace lab's (mailserver.sh, gateway.sh and client-mta.sh run in the lab
tests); the one script only the VMs need, network.sh, runs here on three
namespaces wired the way Vagrant wires the VMs, and must give them the
namespace lab's addresses and routes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from sapd_nfq.lab import Lab

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
PROVISION = ROOT / "sapd_nfq" / "lab" / "provision"
PREFIX = "sapdv"  # the VM-like namespaces
REFERENCE_PREFIX = "sapdv-ref"  # a namespace lab to compare with
# How Vagrant leaves the VMs before provisioning: (vm, nic) -- (vm, nic) per lab network,
# the IPv4 address of each nic, and a stand-in for the NAT link that holds the default route.
WIRES = ((("client", "eth1"), ("gw", "eth1")), (("gw", "eth2"), ("server", "eth1")))
VAGRANT_IPV4 = {("client", "eth1"): "198.18.1.2", ("gw", "eth1"): "198.18.1.1",
                ("gw", "eth2"): "198.18.2.1", ("server", "eth1"): "198.18.2.2"}
NAT_ADDRESS, NAT_GATEWAY = "198.19.254.15", "198.19.254.2"
LINK_TIMEOUT = 5.0  # seconds for a renamed link to come up again


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing capability is a failure)", pytrace=False)
    pytest.skip(reason)


def test_the_vagrantfile_is_valid(tmp_path):
    if shutil.which("vagrant") is None:
        _unavailable("needs vagrant (setup.sh installs it)")
    # Vagrant's state goes to tmp_path, not to vagrant/.vagrant or ~/.vagrant.d.
    env = dict(os.environ, VAGRANT_HOME=str(tmp_path / "home"),
               VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"), VAGRANT_CHECKPOINT_DISABLE="1")
    done = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=VAGRANT_DIR, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


def test_the_vagrantfile_provisions_with_the_lab_scripts():
    text = (VAGRANT_DIR / "Vagrantfile").read_text()
    used = set(re.findall(r"#\{PROVISION\}/([\w.-]+)", text))
    assert used == {"network.sh", "mailserver.sh", "gateway.sh", "client-mta.sh"}
    for name in used:
        assert os.access(PROVISION / name, os.X_OK), name
    assert "setup.sh --no-vagrant" in text


# --- network.sh ------------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        _unavailable("needs root: creates network namespaces")


def _ns(role: str) -> str:
    return f"{PREFIX}-{role}"


@pytest.fixture
def vms():
    """Namespaces client, gw, server as Vagrant leaves the VMs: a lab nic per network
    with its IPv4 address, and a NAT-like link with the default route (client, server)."""
    _require_root()
    roles = ("client", "gw", "server")
    for role in roles:
        if _ns(role) in netns.listnetns():
            netns.remove(_ns(role))
        netns.create(_ns(role))
    try:
        for (vm_a, nic_a), (vm_b, nic_b) in WIRES:
            with IPRoute(netns=_ns(vm_a)) as ipr:
                ipr.link("add", ifname=nic_a, kind="veth",
                         peer={"ifname": nic_b, "net_ns_fd": _ns(vm_b)})
        for (vm, nic), address in VAGRANT_IPV4.items():
            with IPRoute(netns=_ns(vm)) as ipr:
                index = ipr.link_lookup(ifname=nic)[0]
                ipr.addr("add", index=index, address=address, prefixlen=24)
                ipr.link("set", index=index, state="up")
        for vm in ("client", "server"):
            with IPRoute(netns=_ns(vm)) as ipr:
                ipr.link("add", ifname="eth0", kind="veth", peer={"ifname": "nat0"})
                for nic in ("nat0", "eth0"):
                    ipr.link("set", index=ipr.link_lookup(ifname=nic)[0], state="up")
                ipr.addr("add", index=ipr.link_lookup(ifname="eth0")[0], address=NAT_ADDRESS,
                         prefixlen=24)
                ipr.route("add", dst="0.0.0.0/0", gateway=NAT_GATEWAY)
        yield
    finally:
        for role in roles:
            if _ns(role) in netns.listnetns():
                netns.remove(_ns(role))


def _sh(ns: str, *argv: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


def _lab_addresses(ns: str) -> dict[str, set[str]]:
    """Global addresses by interface name, lo and the NAT stand-in left out."""
    links = json.loads(_sh(ns, "ip", "-j", "addr", "show"))
    return {link["ifname"]: {f"{a['local']}/{a['prefixlen']}" for a in link["addr_info"]
                             if a.get("scope") == "global"}
            for link in links if link["ifname"] not in ("lo", "eth0", "nat0")}


def _wait_until_usable(ns: str) -> None:
    """Renaming takes a link down. Back up, the kernel reports it up within a second or
    so and runs duplicate address detection on its new link-local address; until both
    are done it drops or cannot answer what comes through it."""
    deadline = time.monotonic() + LINK_TIMEOUT
    while True:
        links = [link for link in json.loads(_sh(ns, "ip", "-j", "addr", "show"))
                 if link["ifname"].startswith("to-")]
        if links and all(link["operstate"] == "UP" for link in links) and not any(
                address.get("tentative") for link in links for address in link["addr_info"]):
            return
        assert time.monotonic() < deadline, f"{ns}: links not usable: {links}"
        time.sleep(0.05)


def _connect(ns: str, address: str, port: int = 25) -> str:
    """From `ns`, a TCP connection to a port nobody listens on: "refused" means the
    server's RST came back, so both directions are routed."""
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
            "s.settimeout(5)\n"
            "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('connected')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print(type(e).__name__)\n")
    return _sh(ns, sys.executable, "-c", code, address, str(port)).strip()


def test_network_sh_gives_the_vms_the_namespace_labs_network(vms):
    for role in ("client", "gw", "server"):
        _sh(_ns(role), str(PROVISION / "network.sh"), role)
    got = {role: _lab_addresses(_ns(role)) for role in ("client", "gw", "server")}

    with Lab(prefix=REFERENCE_PREFIX, pool_size=16) as reference:
        wanted = {role: _lab_addresses(host.netns) for role, host in reference.hosts.items()}
    assert got == wanted

    for role in ("client", "gw", "server"):  # a second run changes nothing
        _sh(_ns(role), str(PROVISION / "network.sh"), role)
    assert {role: _lab_addresses(_ns(role)) for role in got} == got
    for role in got:
        _wait_until_usable(_ns(role))

    # Through gw both ways, both families, from the client's own address; Vagrant's
    # default route stays.
    assert _connect(_ns("client"), "198.18.2.2") == "refused"
    assert _connect(_ns("client"), "2001:db8:2::2") == "refused"
    assert _connect(_ns("server"), "198.18.1.2", 9) == "refused"
    route = _sh(_ns("client"), "ip", "route", "get", "198.18.2.2")
    assert "via 198.18.1.1 dev to-gw src 198.18.1.2" in route
    route6 = _sh(_ns("client"), "ip", "-6", "route", "get", "2001:db8:2::2")
    assert "via 2001:db8:1::1 dev to-gw" in route6 and "src 2001:db8:1::2" in route6
    assert f"default via {NAT_GATEWAY} dev eth0" in _sh(_ns("client"), "ip", "route")
