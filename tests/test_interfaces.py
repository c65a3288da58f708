"""The checks that refuse a gate whose rules would run blind, and direction on a
bridge, on hosts described by hand (no kernel)."""

from __future__ import annotations

import socket
import subprocess
import sys
from dataclasses import replace

import pytest

from sapd_nfq.engine.errors import ConfigError
from sapd_nfq.kernel import interfaces
from sapd_nfq.kernel.interfaces import HostNet, Link, blind_spots, refuse_blind
from sapd_nfq.wiring.config import Config


def host(*links: Link, forwarding=(True, True), bridge_nf=(True, True)) -> HostNet:
    return HostNet({link.name: link for link in (Link("lo"), *links)}, forwarding, bridge_nf)


#: a transparent gateway: br0 over c1 (clients) and m1 (mail servers)
BRIDGED = (Link("br0", "bridge"), Link("c1", "veth", "br0"), Link("m1", "veth", "br0"))
#: a router: clients on eth0, servers on eth1
ROUTED = (Link("eth0", "veth"), Link("eth1", "veth"))


def test_a_bridge_port_with_netfilter_calls_is_fine_and_known_as_a_port():
    h = host(*BRIDGED, forwarding=(False, False))  # bridging needs no IP forwarding
    assert blind_spots("forward", ["c1"], h) == []
    assert h.bridge_ports(["c1", "eth9", "c+"]) == ("c1",)


@pytest.mark.parametrize("calls,off", [((False, True), ["iptables"]), ((True, False), ["ip6tables"]),
                                       ((False, False), ["iptables", "ip6tables"])])
def test_a_bridge_without_netfilter_calls_is_refused_naming_the_sysctl(calls, off):
    problems = blind_spots("forward", ["c1"], host(*BRIDGED, bridge_nf=calls))
    assert len(problems) == len(off)
    for problem, tool in zip(problems, off):
        assert "'c1' is a port of the bridge 'br0'" in problem and "never reaches iptables" in problem
        assert f"sysctl -w net.bridge.bridge-nf-call-{tool}=1" in problem
        assert f"ip link set br0 type bridge nf_call_{tool} 1" in problem


def test_the_bridge_s_own_netfilter_option_is_enough():
    br0 = Link("br0", "bridge", nf_call=(True, True))
    assert blind_spots("forward", ["c1"], host(br0, *BRIDGED[1:], bridge_nf=(False, False))) == []


def test_without_br_netfilter_nothing_bridged_reaches_iptables():
    problems = blind_spots("forward", ["c1"], host(*BRIDGED, bridge_nf=None))
    assert len(problems) == 2 and all("modprobe br_netfilter" in p for p in problems)


def test_input_mode_names_the_bridge_not_its_port():
    [problem] = blind_spots("input", ["c1"], host(*BRIDGED))
    assert "in mode 'input' name 'br0'" in problem
    assert blind_spots("input", ["br0"], host(*BRIDGED)) == []


def test_a_bridge_with_only_client_ports_has_no_server_behind_it():
    [problem] = blind_spots("forward", ["c1", "m1"], host(*BRIDGED))
    assert "every port of the bridge 'br0' is named" in problem


def test_the_bridge_and_its_port_together_are_refused():
    problems = blind_spots("forward", ["br0", "c1"], host(*BRIDGED, Link("eth1")))
    assert any("both the bridge 'br0' and its port(s) c1" in p for p in problems)


def test_the_bridge_named_as_routed_needs_a_server_side_elsewhere():
    # clients and servers on one bridge: every packet is -i br0 -o br0, nothing to tell apart
    [problem] = blind_spots("forward", ["br0"], host(*BRIDGED))
    assert "every interface of this host is on the client side" in problem
    assert "name the bridge ports clients come in on" in problem
    # the bridge as a routed client side, servers behind eth1
    assert blind_spots("forward", ["br0"], host(*BRIDGED, Link("eth1"))) == []


@pytest.mark.parametrize("kind", ["bond", "team", "openvswitch"])
def test_a_port_of_another_master_is_never_seen_by_its_own_name(kind):
    links = (Link("bond0", kind), Link("eth0", "veth", "bond0"), Link("eth1"))
    [problem] = blind_spots("forward", ["eth0"], host(*links))
    assert f"enslaved to 'bond0' ({kind})" in problem and "name 'bond0'" in problem


def test_a_vrf_port_is_seen_as_itself():
    links = (Link("vrf0", "vrf"), Link("eth0", "veth", "vrf0"), Link("eth1"))
    assert blind_spots("forward", ["eth0"], host(*links)) == []


def test_a_prefix_that_takes_in_bridge_ports_is_refused():
    [problem] = blind_spots("forward", ["c+"], host(*BRIDGED, Link("eth1")))
    assert "'c+' takes in bridge ports (c1)" in problem


def test_forward_mode_on_a_host_that_forwards_nothing():
    [problem] = blind_spots("forward", ["eth0"], host(*ROUTED, forwarding=(False, False)))
    assert "forwards neither IPv4 nor IPv6" in problem and 'mode = "input"' in problem
    assert blind_spots("forward", ["eth0"], host(*ROUTED, forwarding=(False, True))) == []
    assert blind_spots("input", ["eth0"], host(*ROUTED, forwarding=(False, False))) == []


def test_refuse_blind_lists_every_problem_in_one_error():
    with pytest.raises(ConfigError) as caught:
        refuse_blind("forward", ["c1"], host(*BRIDGED, bridge_nf=(False, False)))
    text = str(caught.value)
    assert text.startswith("the rules would not see the mail")
    assert "bridge-nf-call-iptables" in text and "bridge-nf-call-ip6tables" in text
    assert refuse_blind("forward", ["c1"], host(*BRIDGED)).bridge_ports(["c1"]) == ("c1",)


# --- direction on a bridge ----------------------------------------------------------

NAMES = {1: "lo", 2: "br0", 3: "c1", 4: "m1", 5: "eth1"}


@pytest.fixture
def names(monkeypatch):
    def name(index: int) -> str:
        if index not in NAMES:
            raise OSError("no such device")
        return NAMES[index]
    monkeypatch.setattr(socket, "if_indextoname", name)


def test_a_bridged_packet_is_the_client_s_by_its_port_alone(names):
    side = interfaces.ClientSide("forward", ["c1"])
    assert side(2, 3) is True  # in on br0 through c1
    assert side(2, 4) is False  # in on br0 through m1: the server's
    assert side(2, 0) is False  # the bridge device itself, no port: not a client port
    assert side(0, 0) is False  # sent by this host


def test_a_named_bridge_takes_in_all_of_its_ports(names):
    side = interfaces.ClientSide("forward", ["br0"])
    assert side(2, 3) is True and side(2, 4) is True and side(5, 0) is False


# --- status: what the running rules show ---------------------------------------------

def test_status_calls_it_blind_when_smtp_crosses_the_host_and_none_is_queued(monkeypatch):
    from sapd_nfq.admin import status

    monkeypatch.setattr(status, "read_host", lambda: host(*ROUTED))
    config = replace(Config.default(), mode="forward", interfaces=("eth0",))
    unseen = {"ipv4": {"smtp_opens": {"host": 3, "queued": 0}},
              "ipv6": {"smtp_opens": {"host": 0, "queued": 0}}}
    [problem] = status.blind(config, unseen)
    assert problem.startswith("ipv4: 3 SMTP connections opened through this host")
    assert "none of them into the queue" in problem
    seen = {"ipv4": {"smtp_opens": {"host": 3, "queued": 1}}, "ipv6": {"error": "no ip6tables"}}
    assert status.blind(config, seen) == []
    # what `up` would refuse shows while running too: the host may have changed since
    monkeypatch.setattr(status, "read_host", lambda: host(*ROUTED, forwarding=(False, False)))
    assert "forwards neither IPv4 nor IPv6" in status.blind(config, seen)[0]


# --- reading the host, in a child process ------------------------------------------

def test_the_host_read_by_the_child_is_the_host_read_here(tmp_path):
    sysctl = tmp_path / "net"
    (sysctl / "bridge").mkdir(parents=True)
    (sysctl / "ipv4").mkdir()
    (sysctl / "bridge" / "bridge-nf-call-iptables").write_text("1\n")
    (sysctl / "bridge" / "bridge-nf-call-ip6tables").write_text("0\n")
    (sysctl / "ipv4" / "ip_forward").write_text("1\n")
    host = interfaces.read_host(sysctl)
    assert host == interfaces._read_here(sysctl)
    assert host.bridge_nf == (True, False) and host.forwarding == (True, False) and "lo" in host.links


def test_reading_the_host_leaves_pyroute2_out_of_the_process():
    code = ("import sys; from sapd_nfq.kernel.interfaces import read_host; read_host(); "
            "print('pyroute2' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_a_child_that_fails_is_a_config_error(monkeypatch):
    monkeypatch.setattr(interfaces.sys, "executable", "/bin/false")
    with pytest.raises(ConfigError, match="cannot read the host's interfaces"):
        interfaces.read_host()
