"""Forged server replies from the client's own link, against the live gate.

The attack: a client that does not know alice's password sends `USER alice`,
`PASS wrong`, and while the server has not answered yet, puts on its own
link (layer 2, to the gateway's MAC) a segment with the server's address and
port, the server's next sequence number and `+OK Logged in.`. A gate that
took that for the server's reply would open the relay for the client. The
same with SMTP: a forged `354` to a DATA the server refuses would make the
gate read the next RCPT as message text, while the server reads it as a
command.

To make the race certain, the server's real reply is held back for a
moment (a filter rule in the server's own OUTPUT chain); TCP retransmits it.
Each case first runs on the bare lab, where the gateway forwards the forgery
back to the client, which reads it as the server's reply: the segment goes
where the queue rules can see it. Then with the gate, in forward mode (the
spoof is dropped before routing, counted on the guard rule), in forward mode
with the guard and the interface checks of the rules taken out (the daemon
gets it and the engine drops it: defence in depth), and in input mode
(OUTPUT sees only what the server host sends: the forgery never reaches the
daemon). In every gated case no login is learned and the relay stays shut.
"""

from __future__ import annotations

import socket
import time
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import CLIENT_TIMEOUT, Gate, PostfixLog, relay_denied, try_rcpt, wait_until
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from sapd_nfq.kernel.rules import FROM_SERVER, GUARD

pytestmark = pytest.mark.lab

FAMILIES = [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")]
EXTERNAL = "forged@external.example"
LOCAL = "alice@lab.example"
ETH_P_ALL = 0x0003


class Tap:
    """The client's link, raw: what crosses it, and frames put on it."""

    def __init__(self, lab, ifname: str = "to-gw") -> None:
        with lab.inside("client"):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            self.sock.bind((ifname, 0))
        self.sock.setblocking(False)
        self.mac = _mac(lab, "client", ifname)
        self.gw_mac = _mac(lab, "gw", "to-client")
        self.seen: list[Ether] = []

    def drain(self) -> None:
        while True:
            try:
                frame = self.sock.recv(65535)
            except BlockingIOError:
                return
            self.seen.append(Ether(frame))

    def segments(self, src: str, sport: int, dst: str, dport: int) -> list:
        self.drain()
        return [f[TCP] for f in self.seen if TCP in f and f[TCP].sport == sport and f[TCP].dport == dport
                and f.payload.src == src and f.payload.dst == dst]

    def send(self, packet) -> None:
        self.sock.send(bytes(Ether(src=self.mac, dst=self.gw_mac) / packet))

    def close(self) -> None:
        self.sock.close()


def _mac(lab, host: str, ifname: str) -> str:
    return lab.run(host, ["cat", f"/sys/class/net/{ifname}/address"], capture_output=True,
                   text=True).stdout.strip()


def _iptables(family: int) -> str:
    return "ip6tables" if family == AF_INET6 else "iptables"


class Forger:
    """A plain TCP session from `source`, and forged segments of its server."""

    def __init__(self, lab, family: int, source: str, server: str, port: int) -> None:
        self.lab, self.family, self.source, self.server, self.port = lab, family, source, server, port
        self.tap = Tap(lab)
        with lab.inside("client"):
            self.sock = socket.create_connection((server, port), CLIENT_TIMEOUT, source_address=(source, 0))
        self.cport = self.sock.getsockname()[1]
        self.file = self.sock.makefile("rb")
        self.hold = ["OUTPUT", "-p", "tcp", "--sport", str(port), "-d", source, "-j", "DROP"]

    def line(self) -> bytes:
        return self.file.readline()

    def reply(self) -> bytes:
        """One SMTP or POP3 reply, multi-line SMTP replies whole."""
        lines = [self.line()]
        while self.port == 25 and lines[-1][3:4] == b"-":
            lines.append(self.line())
        return b"".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_held(self, command: bytes, forged: bytes) -> bytes:
        """Send `command` with the server's answer held back, put `forged` on
        the link as the answer, let the real one go, and return what the
        client then reads."""
        self.lab.run("server", [_iptables(self.family), "-I", *self.hold])
        try:
            self.send(command)
            mine = wait_until(lambda: [s for s in self.tap.segments(self.source, self.cport, self.server,
                                                                     self.port)
                                       if bytes(s.payload).endswith(command)],
                              CLIENT_TIMEOUT, "the command on the client's link")[-1]
            theirs = self.tap.segments(self.server, self.port, self.source, self.cport)
            last = theirs[-1]
            server_next = last.seq + len(bytes(last.payload)) + bool(last.flags & 0x01)
            ip = IPv6 if self.family == AF_INET6 else IP
            self.tap.send(ip(src=self.server, dst=self.source)
                          / TCP(sport=self.port, dport=self.cport, flags="PA", seq=server_next,
                                ack=mine.seq + len(bytes(mine.payload)), window=last.window)
                          / forged)
            time.sleep(0.2)  # the forgery goes first
        finally:
            self.lab.run("server", [_iptables(self.family), "-D", *self.hold])
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()
        self.tap.close()


def forge_pop3_login(lab, family: int, source: str, server: str) -> bytes:
    """USER alice, PASS wrong, and a forged +OK: what the client read after PASS."""
    f = Forger(lab, family, source, server, 110)
    try:
        assert f.reply().startswith(b"+OK")
        f.send(b"USER alice\r\n")
        assert f.reply().startswith(b"+OK")
        return f.send_held(b"PASS wrong\r\n", b"+OK Logged in.\r\n")
    finally:
        f.close()


def forge_smtp_354(lab, family: int, source: str, server: str) -> tuple[bytes, bytes]:
    """MAIL, DATA with no recipient and a forged 354, then RCPT to an external
    address as if it were message text: what the client read after DATA and
    after the RCPT."""
    f = Forger(lab, family, source, server, 25)
    try:
        assert f.reply().startswith(b"220")
        f.send(b"EHLO client.lab.example\r\n")
        assert f.reply().startswith(b"250")
        f.send(f"MAIL FROM:<{LOCAL}>\r\n".encode())
        assert f.reply().startswith(b"250")
        after_data = f.send_held(b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n")
        f.send(f"RCPT TO:<{EXTERNAL}>\r\n".encode())
        try:
            after_rcpt = f.reply()
        except OSError as exc:  # the gate resets the session after its 550
            after_rcpt = str(exc).encode()
        return after_data, after_rcpt
    finally:
        f.close()


def no_login(gate: Gate, source: str) -> None:
    listed = gate.cli("auth", "list").stdout
    assert source not in listed, listed
    family = AF_INET6 if ":" in source else AF_INET
    refused = try_rcpt(gate.lab, source, gate.lab.server.address(family), LOCAL,
                       "after-forgery@external.example")
    assert refused is not None and refused.code == 550, refused


def guard_drops(gate: Gate, family: int) -> int:
    _, status = gate.status()
    rules = status["rules"]["ipv6" if family == AF_INET6 else "ipv4"]["rules"]
    return sum(r["packets"] for r in rules if r["chain"] == GUARD)


def strip_ingress_rules(gate: Gate, family: int) -> None:
    """Take out what the rules do about ingress, as the rules before it were."""
    for rule in (["PREROUTING", "-i", "to-client", "-j", GUARD],
                 [FROM_SERVER, "-i", "to-client", "-j", "RETURN"]):
        gate.lab.run("gw", [_iptables(family), "-t", "mangle", "-D", *rule])


def counter(gate: Gate, name: str) -> int:
    _, status = gate.status()
    return sum(w.get("counters", {}).get(name, 0) for w in status["workers"])


def server_route_via(lab, destination: str) -> tuple[str, str]:
    """The server's next hop to `destination`, and its default IPv6 gateway."""
    def via(argv: list[str]) -> str:
        words = lab.run("server", argv, capture_output=True, text=True).stdout.split()
        return words[words.index("via") + 1] if "via" in words else ""
    return via(["ip", "-6", "route", "get", destination]), via(["ip", "-6", "route", "show", "default"])


def undo_redirects(lab) -> None:
    """An IPv6 forgery that crosses a gateway with no guard makes it send the
    real server a redirect, after which the server looks for the client on its
    own link: forget it, so the server reaches that client again."""
    lab.run("server", ["ip", "-6", "route", "flush", "cache"], check=False)


@pytest.fixture
def redirects_undone(lab):
    yield
    undo_redirects(lab)


@pytest.fixture
def redirects_ignored(lab):
    """The server ignores redirects for a while: what the rules would have
    stopped before routing must not hide what the engine does."""
    key = "net.ipv6.conf.to-gw.accept_redirects"
    old = lab.run("server", ["sysctl", "-n", key], capture_output=True, text=True).stdout.strip()
    lab.run("server", ["sysctl", "-qw", f"{key}=0"])
    yield
    lab.run("server", ["sysctl", "-qw", f"{key}={old}"])
    undo_redirects(lab)


# --- the bare lab: the forgery reaches the client through the gateway -------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_gate_a_forged_pop3_ok_is_forwarded_as_the_servers(lab, mail_server, fresh, family,
                                                                       redirects_undone):
    source, server = fresh(family), lab.server.address(family)
    assert forge_pop3_login(lab, family, source, server) == b"+OK Logged in.\r\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_gate_a_forged_354_lets_a_rcpt_through(lab, mail_server, fresh, family, redirects_undone):
    source, server = fresh(family), lab.server.address(family)
    postfix = PostfixLog(mail_server)
    after_data, _ = forge_smtp_354(lab, family, source, server)
    assert after_data.startswith(b"354")
    # The server read the "message text" as a command and accepted the
    # recipient (smtpd's closing line counts it). What the client reads after
    # is out of step: the forgery and the real 503 differ in length.
    assert " rcpt=1 " in postfix.disconnect(source, timeout=30)


# --- with the gate -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_forward_mode_drops_a_forged_pop3_ok_before_routing(lab, mail_server, make_gate, fresh, family):
    gate = make_gate("forward")
    source, server = fresh(family), lab.server.address(family)
    assert forge_pop3_login(lab, family, source, server).startswith(b"-ERR")
    assert guard_drops(gate, family) >= 1
    no_login(gate, source)
    if family == AF_INET6:
        # No redirect was sent: the server still reaches the client through gw.
        hop, default = server_route_via(lab, source)
        assert hop == default != "", (hop, default)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_mode_drops_a_forged_354(lab, mail_server, make_gate, fresh, family):
    gate = make_gate("forward")
    source, server = fresh(family), lab.server.address(family)
    after_data, after_rcpt = forge_smtp_354(lab, family, source, server)
    assert after_data.startswith(b"554"), after_data  # the server's own answer
    assert relay_denied(after_rcpt), after_rcpt
    assert guard_drops(gate, family) >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_the_engine_drops_a_forgery_the_rules_let_through(lab, mail_server, make_gate, fresh, family,
                                                          redirects_ignored):
    gate = make_gate("forward")
    strip_ingress_rules(gate, family)
    source, server = fresh(family), lab.server.address(family)
    assert forge_pop3_login(lab, family, source, server).startswith(b"-ERR")
    assert guard_drops(gate, family) == 0
    assert counter(gate, "wrong_direction") >= 1
    after_data, after_rcpt = forge_smtp_354(lab, family, source, server)
    assert after_data.startswith(b"554") and relay_denied(after_rcpt), (after_data, after_rcpt)
    no_login(gate, source)


@pytest.mark.parametrize("family", FAMILIES)
def test_input_mode_never_sees_a_forgery_from_outside(lab, mail_server, make_gate, fresh, family,
                                                      redirects_undone):
    gate = make_gate("input")
    source, server = fresh(family), lab.server.address(family)
    # gw, no gate of its own, hands the forgery back to the client: the client
    # fools itself; the server host, where the gate runs, never sees it.
    assert forge_pop3_login(lab, family, source, server) == b"+OK Logged in.\r\n"
    undo_redirects(lab)
    no_login(gate, source)
    assert counter(gate, "wrong_direction") == 0
