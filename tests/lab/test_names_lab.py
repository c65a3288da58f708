"""The lab answers its own name lookups: no lab process waits on a resolver.

Each namespace sees the lab's /etc/hosts (its hosts and this machine's name,
which swaks and Postfix look up) and a resolver on its own loopback, where
nothing listens. Where the host's /etc/hosts lacks the machine's name, a
lookup that reached the host's resolver from inside a namespace would go
towards gw and die there, a timeout in every SMTP session.
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from sapd_nfq.lab import capture
from sapd_nfq.lab.topology import NETNS_ETC

ROLES = ("client", "gw", "server")


def _getent(lab, role: str, *names: str) -> subprocess.CompletedProcess:
    return lab.run(role, ["getent", "ahosts", *names], check=False, capture_output=True,
                   text=True, timeout=30)


@pytest.mark.parametrize("role", ROLES)
def test_every_host_resolves_the_lab_and_this_machine_from_its_own_files(lab, role):
    assert (NETNS_ETC / lab.host(role).netns / "hosts").read_text() == lab.hosts_file()
    seen = lab.run(role, ["cat", "/etc/hosts"], capture_output=True, text=True).stdout
    assert seen == lab.hosts_file()
    machine = _getent(lab, role, socket.gethostname())
    assert machine.returncode == 0 and "127.0.1.1" in machine.stdout, machine
    mail = _getent(lab, role, "mail.lab.example")
    assert mail.returncode == 0 and lab.server.ipv4 in mail.stdout, mail


def test_an_unknown_name_fails_inside_the_lab_without_a_packet_leaving_it(lab, tmp_path):
    pcap = tmp_path / "dns.pcap"
    with capture(lab, "client", pcap, bpf="port 53"):
        unknown = _getent(lab, "client", "nowhere.example")
    assert unknown.returncode == 2, unknown  # getent: not found
    read = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True,
                          check=True)
    assert read.stdout == "", read.stdout


def test_the_lab_removes_its_name_files(lab):
    from sapd_nfq.lab import Lab

    other = Lab(prefix=f"{lab.prefix}-names", pool_size=0)
    other.up()
    directories = [NETNS_ETC / host.netns for host in other.hosts.values()]
    assert all(d.is_dir() for d in directories)
    other.down()
    assert not any(d.exists() for d in directories)
    assert (NETNS_ETC / lab.client.netns).is_dir()  # the session's lab keeps its own
