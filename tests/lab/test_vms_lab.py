"""The lab as three VMs that really boot: vagrant/ under libvirt and QEMU's emulation.

The module builds the box if the tree's box key has changed (vagrant/build-box.sh; the box
is cached in /var/cache/sapd-nfq-vms for the next run) and the Debian package, starts
libvirtd in a network namespace of its own, brings the three VMs up with `vagrant up` (gw
installs the package and systemd runs its unit), runs the end-to-end lab tests inside them
(the demo's story and the relay table through a sending Postfix, which read
SAPD_LAB_VAGRANT) and one hostile case, purges the package from gw and checks gw's firewall
is as it was before the install, then destroys the VMs and checks that the host is as it
was: its firewall, links, namespaces, libvirt's definitions and images, no QEMU.
Each step's time is printed. `-m 'not vms'` leaves the module out (about 15 minutes here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapd_nfq.lab.topology import LabError

pytestmark = [pytest.mark.lab, pytest.mark.vms]

ROOT = Path(__file__).resolve().parents[2]
VAGRANT_DIR = ROOT / "vagrant"
INNER_TIMEOUT = 1800  # seconds for the lab tests inside the VMs
#: gw's iptables-save and ip6tables-save before the package went in (vagrant/Vagrantfile)
FIREWALL_BEFORE = "/var/lib/sapd-lab/firewall-before-package"
SENDER = "alice@lab.example"
OUTSIDE = "dave@external.example"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing capability is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def report(request):
    """Writes a line to the terminal, past pytest's capture: the steps' times."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            print(f"\nvms: {line}", flush=True)
    return write


@pytest.fixture(scope="module")
def vms(tmp_path_factory, report):
    """The three VMs, up and provisioned; destroyed after the module, whatever happens."""
    if os.geteuid() != 0:
        _unavailable("needs root: libvirtd, network namespaces, debootstrap")
    from sapd_nfq.lab.vmhost import VMHost, missing_tools

    if missing := missing_tools():
        _unavailable(f"needs {', '.join(missing)} (setup.sh installs them)")
    host = VMHost(VAGRANT_DIR, console_dir=tmp_path_factory.mktemp("consoles"))
    host.console_dir.chmod(0o777)  # QEMU writes the consoles as libvirt's user
    try:
        host.up()
    except (LabError, OSError, subprocess.SubprocessError) as exc:  # whatever step failed
        consoles = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                             for p in sorted(host.console_dir.glob("*.log")))
        host.destroy()
        pytest.fail(f"the VMs did not come up: {exc}\n{consoles}", pytrace=False)
    report(f"up: {host.timings}")
    try:
        yield host
    finally:
        host.destroy()
        report(f"destroyed: {host.timings}")


def _inner_pytest(vms, *tests: str) -> str:
    """The namespace lab's tests that read SAPD_LAB_VAGRANT, run against the VMs."""
    env = dict(vms.env, SAPD_LAB_VAGRANT=str(VAGRANT_DIR))
    done = subprocess.run(vms.command([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                       *tests]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=INNER_TIMEOUT)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    assert "skipped" not in out.splitlines()[-1], out[-3000:]
    return out.splitlines()[-1]


def test_the_vms_run_the_lab(vms, report):
    from sapd_nfq.lab.vagrant import VagrantLab

    with VagrantLab(VAGRANT_DIR, via=vms.command([]), env=vms.env) as lab:
        kernels = {role: lab.run(role, ["uname", "-r"], capture_output=True, text=True).stdout.strip()
                   for role in ("client", "gw", "server")}
        assert all(k.endswith("-cloud-amd64") for k in kernels.values()), kernels
        forwarding = lab.run("gw", ["sysctl", "-n", "net.ipv4.ip_forward"], capture_output=True,
                             text=True).stdout.strip()
        assert forwarding == "1"
        status = lab.gate().cli("status", check=False)
        assert status.returncode == 0, status.stdout + status.stderr
        unit = [lab.run("gw", ["systemctl", query, "sapd-nfq.service"], check=False,
                        capture_output=True, text=True).stdout.strip() for query in ("is-enabled", "is-active")]
        assert unit == ["enabled", "active"]
        package = lab.run("gw", ["dpkg-query", "-W", "-f", "${Version} ${Status}", "sapd-nfq"],
                          capture_output=True, text=True).stdout
        security = lab.run("gw", ["systemd-analyze", "security", "--no-pager", "sapd-nfq.service"],
                           check=False, capture_output=True, text=True).stdout.strip().splitlines()
    report(f"kernels {kernels}; gw runs sapd-nfq {package} under systemd; {security[-1] if security else ''}")


def test_the_demo_on_the_vms(vms, report):
    started = time.monotonic()
    summary = _inner_pytest(vms, "tests/lab/test_demo_lab.py::test_the_demo_tells_the_story_and_leaves_nothing")
    report(f"demo: {summary} in {time.monotonic() - started:.0f} s")


def test_the_relay_table_through_a_sending_postfix_on_the_vms(vms, report):
    started = time.monotonic()
    summary = _inner_pytest(vms, "tests/lab/test_mta_client_lab.py")
    report(f"relay table: {summary} in {time.monotonic() - started:.0f} s")


# A relay attempt with its RCPT sent a byte a segment (Nagle off), from the client VM, which
# never logged in. Prints the code of the reply to the RCPT, or "reset".
DRIP = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], 25), timeout=60)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
replies = s.makefile("rb")
def reply():
    while True:
        line = replies.readline()
        if not line:
            raise ConnectionResetError
        if line[3:4] != b"-":
            return line[:3].decode()
try:
    reply()
    s.sendall(b"EHLO client.lab.example\r\n"); reply()
    s.sendall(b"MAIL FROM:<" + sys.argv[2].encode() + b">\r\n"); reply()
    for byte in b"RCPT TO:<" + sys.argv[3].encode() + b">\r\n":
        s.send(bytes([byte]))
        time.sleep(0.05)
    print(reply())
    s.sendall(b"QUIT\r\n")
except OSError:
    print("reset")
"""


def test_a_relay_in_one_byte_segments_is_refused_on_the_vms(vms):
    from sapd_nfq.lab.vagrant import VagrantLab

    with VagrantLab(VAGRANT_DIR, via=vms.command([]), env=vms.env) as lab:
        gate = lab.gate()

        def attempt() -> str:
            gate.cli("auth", "del", lab.client.ipv4, check=False)
            done = lab.run(lab.client, ["python3", "-c", DRIP, lab.server.ipv4, SENDER, OUTSIDE],
                           capture_output=True, text=True, timeout=300)
            return done.stdout.strip()

        gate.stop()  # the rules out: the VMs' lab as it is without sapd-nfq
        try:
            assert attempt() == "250"  # so the attempt is a relay the gate must stop
        finally:
            gate.start()
        offset = gate.log_size()
        assert attempt() in ("550", "reset")
        fails = [line for line in gate.wait_for_log("FAIL", offset) if " FAIL " in line]
        assert f" client={lab.client.ipv4} " in fails[0]
        assert f" sender='{SENDER}' recipient='{OUTSIDE}'" in fails[0]


def _firewall(saved: str) -> set[str]:
    """iptables-save's rules and chains, as "table line"; a table of empty built-in chains
    that accept (what merely listing a table leaves) counts as no table."""
    found, table = set(), ""
    for line in saved.splitlines():
        line = re.sub(r" \[\d+:\d+\]$", "", line)  # the counters
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A ") or line.startswith(":") and not re.fullmatch(
                r":(INPUT|FORWARD|OUTPUT|PREROUTING|POSTROUTING) ACCEPT", line):
            found.add(f"{table} {line}")
    return found


def test_purging_the_package_leaves_the_gateway_firewall_as_it_was(vms, report):
    from sapd_nfq.lab.vagrant import VagrantLab

    with VagrantLab(VAGRANT_DIR, via=vms.command([]), env=vms.env) as lab:
        def firewall() -> str:
            return "".join(lab.run("gw", [save], capture_output=True, text=True).stdout
                           for save in ("iptables-save", "ip6tables-save"))

        assert "SAPD_NFQ" in firewall()
        lab.run("gw", ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "purge", "-y", "-q", "sapd-nfq"],
                capture_output=True)
        before = lab.run("gw", ["cat", FIREWALL_BEFORE], capture_output=True, text=True).stdout
        after = firewall()
        assert _firewall(after) == _firewall(before), after
        left = lab.run("gw", ["ls", "-d", "/etc/sapd-nfq", "/var/lib/sapd-nfq", "/usr/sbin/sapd-nfq"],
                       check=False, capture_output=True, text=True).stdout
        assert left == ""
    report(f"purged: gw's firewall as before the package ({len(_firewall(before))} rules and chains)")


def test_destroy_leaves_the_host_as_it_was(vms, report):
    vms.destroy()
    assert vms.leftovers() == {}
