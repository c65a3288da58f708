"""Hostile traffic against the live daemon: relay attempts hidden by TCP, IP and grammar tricks.

Each attempt comes from a client that never logged in: MAIL FROM:<alice@lab.example>,
then a RCPT to an external recipient, hidden by a trick: segments out of order,
overlapping or lost after the gate, urgent data, data on a SYN or after a FIN, RSTs,
a SYN on a live flow's ports, IPv6 extension headers, IP options and fragments, tiny
segments, data in segments as long as pure ACKs, a slow drip, spellings Postfix
accepts. Each runs three ways, the `where` fixture:

- "bare": the lab without the gate. The lab's Postfix relays for every lab client,
  so there the trick must get the RCPT accepted: proof that the test can fail;
- "forward": sapd-nfq on gw; "input": sapd-nfq in the server namespace beside
  Postfix. The RCPT must be refused there, or never reach Postfix, as Postfix's own
  log confirms (smtpd's closing line counts the RCPTs it accepted).

Tricks that need segments no kernel sends talk raw TCP (rawtcp.py) from an address
whose kernel RSTs are silenced for the whole module. Floods are bounded in count and
time and print their figures; nothing here asserts a timing, only that every relay
attempt was refused and every inbound message delivered.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import REPO, Gate, PostfixLog, external, relay_denied, stop_and_check, wait_until
from rawtcp import RawTCP, silence_kernel
from scapy.layers.inet import IPOption_NOP
from scapy.layers.inet6 import HBHOptUnknown, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, PadN

pytestmark = pytest.mark.lab

WHERE = ("bare", "forward", "input")
FAMILIES = {AF_INET: "ipv4", AF_INET6: "ipv6"}
SENDER = b"alice@lab.example"
CLIENT_TIMEOUT = 10.0
SETTLE = 0.2  # seconds for a segment to arrive and be answered, where nothing else tells
# The gate's config for the whole module: a small flow table, so that the SYN flood
# overflows it, and a second SMTP port for the idle flows (bench/responder.py).
MAX_FLOWS = 1024
IDLE_PORT = 2525
GATE_SETTINGS = {"max_flows": MAX_FLOWS, "smtp_ports": [25, IDLE_PORT]}
# The client pool, split between uses: kernel RSTs are silenced on RAW and SYN_FLOOD.
RAW, TALK, INBOUND, RELAY_FLOOD, IDLE, SYN_FLOOD = (0,), (1,), (2,), (3, 4, 5), (6, 7), (8, 9)


def recipient() -> bytes:
    """An external recipient no other attempt names."""
    return external().encode()


def rcpt_line(address: bytes) -> bytes:
    return b"RCPT TO:<" + address + b">\r\n"


def pool(lab, family: int, which: tuple[int, ...]) -> list[str]:
    addresses = lab.client.pool_ipv6 if family == AF_INET6 else lab.client.pool_ipv4
    return [addresses[i] for i in which]


def accepted_rcpts(closing: str) -> int:
    """RCPTs Postfix accepted, from smtpd's closing line (`rcpt=2` or `rcpt=1/2`)."""
    found = re.search(r"\brcpt=(\d+)", closing)
    return int(found[1]) if found else 0


# --- where the attempt runs: the bare lab, or behind the gate -------------------------------

@dataclass
class Target:
    mode: str
    gate: Gate | None

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def counters(self) -> dict[str, int]:
        return dict(self.gate.control("status")["counters"]) if self.gate else {}

    def status(self) -> dict:
        return self.gate.control("status") if self.gate else {}


@pytest.fixture(scope="module")
def where(request, lab, mail_server, tmp_path_factory) -> Iterator[Target]:
    """The bare lab, or sapd-nfq in forward or input mode (one daemon per mode and module)."""
    mode = request.param
    if mode == "bare":
        yield Target(mode, None)
        return
    gate = Gate(lab, tmp_path_factory.mktemp(f"gate-{mode}"), mode, **GATE_SETTINGS)
    gate.up()
    gate.start()
    yield Target(mode, gate)
    problems = stop_and_check(gate, mail_server)
    assert not problems, "\n".join(problems) + "\n" + gate.log()


@pytest.fixture(scope="module")
def raw_quiet(lab) -> Iterator[None]:
    """The client's kernel sends no RSTs from the raw-TCP addresses (module-wide)."""
    with ExitStack() as stack:
        for family in FAMILIES:
            for src in pool(lab, family, RAW):
                stack.enter_context(silence_kernel(lab, "client", src))
        yield


# --- things between the gate and Postfix --------------------------------------------------

@contextmanager
def hop_after_the_gate(lab) -> Iterator[None]:
    """A router between gateway and MTA where a TTL/hop limit of 1 runs out: the lab has
    none, so the server drops what arrives with 1 left, as that router would."""
    rules = [("iptables", ["-m", "ttl", "--ttl-eq", "1"]), ("ip6tables", ["-m", "hl", "--hl-eq", "1"])]
    spec = ["PREROUTING", "-i", "to-gw"]
    for tables, match in rules:
        lab.run("server", [tables, "-w", "-t", "raw", "-I", *spec, *match, "-j", "DROP"])
    try:
        yield
    finally:
        for tables, match in rules:
            lab.run("server", [tables, "-w", "-t", "raw", "-D", *spec, *match, "-j", "DROP"],
                    check=False)


@contextmanager
def smaller_mtu_after_the_gate(lab) -> Iterator[None]:
    """The server's link takes 1280 bytes a packet while gw forwards 1500: a bigger
    packet passes the gate and is lost at the server (an MTU black hole)."""
    lab.run("server", ["ip", "link", "set", "to-gw", "mtu", "1280"])
    try:
        yield
    finally:
        lab.run("server", ["ip", "link", "set", "to-gw", "mtu", "1500"])


# --- one attempt on raw TCP -------------------------------------------------------------------

@dataclass
class Attempt:
    """One relay attempt from the raw-TCP address of `family`."""

    lab: object
    target: Target
    family: int
    recipient: bytes = field(default_factory=recipient)
    sessions: list[RawTCP] = field(default_factory=list)

    @property
    def src(self) -> str:
        return pool(self.lab, self.family, RAW)[0]

    @property
    def dst(self) -> str:
        return self.lab.server.address(self.family)

    @property
    def relay(self) -> bytes:
        return rcpt_line(self.recipient)

    def raw(self, port: int = 25, **kw) -> RawTCP:
        tcp = RawTCP(self.lab, self.src, self.dst, port, silence=False, **kw)
        tcp.open()
        self.sessions.append(tcp)
        return tcp

    def session(self, **kw) -> RawTCP:
        """Connected, greeted, EHLO and MAIL FROM done."""
        tcp = self.raw(**kw)
        tcp.connect()
        assert tcp.reply().startswith(b"220")
        for line in (b"EHLO hostile.example\r\n", b"MAIL FROM:<" + SENDER + b">\r\n"):
            tcp.send(line)
            assert tcp.reply().startswith(b"250"), line
        return tcp

    def close(self) -> None:
        for tcp in self.sessions:
            tcp.close()


def answer(tcp: RawTCP, count: int = 1, timeout: float = 3.0) -> bytes | None:
    """The `count`-th reply from here on, or the first that is not 2xx (a refusal ends
    the session), or None if the connection ended or went silent first."""
    reply = None
    for _ in range(count):
        try:
            reply = tcp.reply(timeout)
        except AssertionError:
            return None
        if not reply.startswith(b"2"):
            return reply
    return reply


# Destination options with one option of type 0x41: "skip the packet", says the type's
# top bits to any node that does not know it. The server discards the whole packet.
DISCARDED = [IPv6ExtHdrDestOpt(options=[HBHOptUnknown(otype=0x41, optdata=b"\0" * 4)])]
# A first copy lost after the gate: a local RCPT, padded to a packet over 1280 bytes
# (the MTU case) in one line (so that the gate counts no extra commands).
FIRST_COPY = b"RCPT TO:<bob@lab.example>\r\nNOOP " + b"x" * 1300 + b"\r\n"


def after(a: Attempt, first: Callable[[RawTCP], object], **session) -> bytes | None:
    """`first(tcp)` on a fresh session, then the relay RCPT: the answer to it."""
    tcp = a.session(**session)
    first(tcp)
    time.sleep(SETTLE)
    tcp.send(a.relay)
    return answer(tcp)


def relay_as(a: Attempt, send: Callable[[RawTCP, bytes], object]) -> bytes | None:
    """The relay RCPT sent by `send(tcp, line)` on a fresh session: the answer to it."""
    tcp = a.session()
    send(tcp, a.relay)
    return answer(tcp)


def lose_first_copy(tcp: RawTCP, **how) -> None:
    """A local RCPT that the gate sees and the server does not (`how` loses it on the
    way). The relay that follows at the same seq is the only copy the server reads."""
    tcp.send(FIRST_COPY, advance=False, **how)
    time.sleep(SETTLE)
    assert tcp.acked == tcp.snd_nxt, "the server acknowledged the lost copy"


def stale(tcp: RawTCP) -> int:
    """A TCP timestamp older than the last one sent: PAWS discards its segment."""
    return tcp.tsval() - 100_000


def reset(tcp: RawTCP, ahead: int = 0, **how) -> None:
    """A RST `ahead` past the exact seq (in window: the server sends a challenge ACK;
    beyond it: ignored); at the exact seq, lost on the way by `how`."""
    tcp.send(flags="R", seq=tcp.snd_nxt + ahead, ack=0, advance=False, **how)


def syn_on_live_ports(tcp: RawTCP) -> None:
    # The server answers a SYN with a new ISN with a challenge ACK and keeps the
    # session: so must the gate, which goes on reading it.
    tcp.send(flags="S", seq=tcp.iss + 123_456_789, ack=0, advance=False, options=[("MSS", 1400)])
    time.sleep(SETTLE)
    tcp.send(b"RCPT TO:<bob@lab.example>\r\n")
    assert tcp.reply().startswith(b"250"), "the session did not survive the SYN"


def gap_ahead(a: Attempt) -> bytes | None:
    tcp = a.session()
    head, tail, base = a.relay[:10], a.relay[10:], tcp.snd_nxt
    tcp.send(tail, seq=base + len(head))       # ahead of a gap
    time.sleep(SETTLE)
    tcp.send(head)                             # the gap filled
    tcp.wait(lambda: tcp.acked != base, what="an ACK of the head")
    time.sleep(SETTLE)
    # Without the gate the server queued the tail and acknowledges both; the gate
    # dropped it, so the server has the head alone until the tail comes again.
    assert tcp.acked == base + (len(head) if a.target.gated else len(a.relay))
    tcp.snd_nxt = base + len(a.relay)
    tcp.send(tail, seq=base + len(head), advance=False)
    return answer(tcp)


def overlap(tcp: RawTCP, relay: bytes) -> None:
    # The second copy differs where it overlaps the first and runs on past it. The
    # server keeps the first bytes and takes the rest from the second; the gate reads
    # the same, or calls a difference in bytes it still holds a conflict.
    tcp.send(b"RCPT TO:<bo", advance=False)
    tcp.send(relay)


def syn_data_discarded(a: Attempt) -> bytes | None:
    # Without TCP Fast Open the server discards data on a SYN; the gate inspected it.
    # The client then sends other bytes in its place.
    tcp = a.raw()
    tcp.connect(b"NOOP\r\n" * 3)
    assert tcp.acked == tcp.iss + 1, "the server took the SYN's data"
    assert tcp.reply().startswith(b"220")
    tcp.snd_nxt = tcp.iss + 1
    tcp.send(b"EHLO hostile.example\r\nMAIL FROM:<" + SENDER + b">\r\n" + a.relay)
    return answer(tcp, 3)


def tiny_segments(tcp: RawTCP, relay: bytes) -> None:
    for byte in relay:
        tcp.send(bytes([byte]))


def ack_only_segments(tcp: RawTCP, relay: bytes) -> None:
    """Data with only the ACK flag, 12 bytes a segment: no TCP options, so each is as long
    as a pure ACK with timestamps, which the rules let by the queue."""
    for start in range(0, len(relay), 12):
        tcp.send(relay[start:start + 12], flags="A")


@dataclass(frozen=True)
class Trick:
    name: str
    run: Callable[[Attempt], bytes | None]
    #: reply prefixes the gate may give (550: judged and refused; 554: refused as a
    #: stream that contradicts itself); 500 for urgent data: Postfix read "XRCPT"
    gated: tuple[bytes, ...] = (b"550",)
    #: a counter of the daemon's that must grow
    counter: str | None = None
    #: local RCPTs Postfix accepts along the way, in every mode
    local: int = 0
    #: what stands between gate and server for the trick
    setup: Callable[[object], object] = lambda lab: nullcontext()

    def __str__(self) -> str:
        return self.name


def _tricks(*tricks: Trick) -> list:
    return [pytest.param(t, id=t.name) for t in tricks]


PADDED = [PadN(optdata=b"\0" * 4)]

# In every mode, both families.
EVERYWHERE = _tricks(
    Trick("data-ahead-of-a-gap", gap_ahead, counter="held_back"),
    Trick("overlap-with-other-bytes", lambda a: relay_as(a, overlap), gated=(b"550", b"554")),
    Trick("first-copy-lost-paws",
          lambda a: after(a, lambda tcp: lose_first_copy(tcp, tsval=stale(tcp)),
                          timestamps=True),
          gated=(b"554",), counter="conflicts"),
    Trick("urgent-byte", lambda a: relay_as(a, lambda tcp, relay: tcp.send(b"X" + relay, flags="PAU", urg=1)),
          gated=(b"500",), counter="urgent_cleared"),
    Trick("syn-data-discarded", syn_data_discarded, gated=(b"554",), counter="conflicts"),
    Trick("data-after-a-lost-fin",
          lambda a: after(a, lambda tcp: tcp.send(flags="FA", tsval=stale(tcp), advance=False),
                          timestamps=True),
          gated=(b"554",), counter="conflicts"),
    Trick("rst-in-window", lambda a: after(a, lambda tcp: reset(tcp, 100))),
    Trick("rst-out-of-window", lambda a: after(a, lambda tcp: reset(tcp, 1 << 30))),
    Trick("syn-on-live-ports", lambda a: after(a, syn_on_live_ports), local=1),
    Trick("ip-fragments", lambda a: relay_as(a, lambda tcp, relay: tcp.send(relay, fragment_size=24))),
    Trick("tiny-segments", lambda a: relay_as(a, tiny_segments)),
    Trick("ack-only-segments-as-long-as-pure-acks", lambda a: relay_as(a, ack_only_segments)),
)
IPV6_ONLY = _tricks(
    Trick("first-copy-lost-ipv6-option", lambda a: after(a, lambda tcp: lose_first_copy(tcp, ext=DISCARDED)),
          gated=(b"554",), counter="conflicts"),
    Trick("rst-lost-ipv6-option", lambda a: after(a, lambda tcp: reset(tcp, ext=DISCARDED)),
          gated=(b"554",), counter="conflicts"),
    Trick("ipv6-extension-headers",
          lambda a: relay_as(a, lambda tcp, relay: tcp.send(
              relay, ext=[IPv6ExtHdrHopByHop(options=PADDED), IPv6ExtHdrDestOpt(options=PADDED)]))),
)
IPV4_ONLY = _tricks(
    Trick("ipv4-options",
          lambda a: relay_as(a, lambda tcp, relay: tcp.send(relay, ip_options=[IPOption_NOP()] * 4))),
)
# Losses on a hop after the gate: forward mode only (in input mode the gate is on the
# last hop), shown first on the bare lab.
AFTER_THE_GATE = _tricks(
    Trick("first-copy-lost-ttl", lambda a: after(a, lambda tcp: lose_first_copy(tcp, ttl=2)),
          gated=(b"554",), counter="conflicts", setup=hop_after_the_gate),
    Trick("first-copy-lost-mtu", lambda a: after(a, lose_first_copy),
          gated=(b"554",), counter="conflicts", setup=smaller_mtu_after_the_gate),
    Trick("rst-lost-ttl", lambda a: after(a, lambda tcp: reset(tcp, ttl=2)),
          gated=(b"554",), counter="conflicts", setup=hop_after_the_gate),
)
FAMILY = [pytest.param(f, id=name) for f, name in FAMILIES.items()]


def run_trick(lab, mail_server, where: Target, trick: Trick, family: int) -> None:
    attempt = Attempt(lab, where, family)
    postfix = PostfixLog(mail_server)
    before = where.counters()
    with trick.setup(lab):
        try:
            reply = trick.run(attempt)
        finally:
            attempt.close()
    closing = postfix.disconnect(attempt.src)
    if not where.gated:
        assert reply is not None and reply.startswith(b"250"), (reply, closing)
        assert accepted_rcpts(closing) == trick.local + 1, closing
        return
    assert reply is None or reply[:3] in trick.gated, reply
    assert accepted_rcpts(closing) == trick.local, closing
    assert postfix.mentions(attempt.recipient.decode()) == []
    if trick.counter:
        assert where.counters().get(trick.counter, 0) > before.get(trick.counter, 0), trick.counter


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("trick", EVERYWHERE)
@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_a_trick_hides_no_relay(lab, mail_server, raw_quiet, where, trick, family):
    run_trick(lab, mail_server, where, trick, family)


# With segmentation offloads and GRO on every link, as a NIC's defaults have them: the
# gateway's GRO merges what a trick sends in order, and the queue gets the merged packet.
OFFLOADED = [t for t in EVERYWHERE if t.id in ("data-ahead-of-a-gap", "overlap-with-other-bytes",
                                              "urgent-byte", "tiny-segments",
                                              "ack-only-segments-as-long-as-pure-acks")]


@pytest.mark.parametrize("links", [pytest.param((1500, True), id="offloads-on")], indirect=True)
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("trick", OFFLOADED)
@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_a_trick_hides_no_relay_with_offloads_on(lab, mail_server, raw_quiet, where, trick, family,
                                                 links):
    run_trick(lab, mail_server, where, trick, family)


@pytest.mark.parametrize("trick", IPV6_ONLY)
@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_an_ipv6_trick_hides_no_relay(lab, mail_server, raw_quiet, where, trick):
    run_trick(lab, mail_server, where, trick, AF_INET6)


@pytest.mark.parametrize("trick", IPV4_ONLY)
@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_an_ipv4_trick_hides_no_relay(lab, mail_server, raw_quiet, where, trick):
    run_trick(lab, mail_server, where, trick, AF_INET)


@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("trick", AFTER_THE_GATE)
@pytest.mark.parametrize("where", ("bare", "forward"), indirect=True)
def test_a_loss_after_the_gate_hides_no_relay(lab, mail_server, raw_quiet, where, trick, family):
    run_trick(lab, mail_server, where, trick, family)


# --- data on a SYN, with TCP Fast Open on the server ---------------------------------------

@pytest.fixture
def fast_open(lab, mail_server) -> Iterator[None]:
    """Postfix restarted with TCP Fast Open for every listener, no cookie needed
    (0x1 client, 0x2 server, 0x200 no cookie, 0x400 without the socket option)."""
    knob = "/proc/sys/net/ipv4/tcp_fastopen"
    with lab.inside("server"):
        before = Path(knob).read_text()
        Path(knob).write_text(str(0x603))
    mail_server.stop()
    mail_server.start()
    try:
        yield
    finally:
        with lab.inside("server"):
            Path(knob).write_text(before)
        mail_server.stop()
        mail_server.start()


@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_a_relay_on_a_fast_open_syn(lab, mail_server, raw_quiet, fast_open, where):
    # Postfix reads a SYN's bytes once it has greeted. The gate reads the RCPT on
    # the SYN and, refusing that recipient alone (the default), rewrites it there.
    for family in FAMILIES:  # one Postfix restart for both
        attempt = Attempt(lab, where, family)
        postfix = PostfixLog(mail_server)
        commands = b"EHLO hostile.example\r\nMAIL FROM:<" + SENDER + b">\r\n" + attempt.relay
        tcp = attempt.raw()
        try:
            tcp.connect(commands)
            assert tcp.acked == tcp.iss + 1 + len(commands), "Postfix did not take the SYN's data"
            assert tcp.reply().startswith(b"220")
            reply = answer(tcp, 3)
        finally:
            attempt.close()
        closing = postfix.disconnect(attempt.src)
        if not where.gated:
            assert reply.startswith(b"250") and accepted_rcpts(closing) == 1, (reply, closing)
            continue
        assert relay_denied(reply) and accepted_rcpts(closing) == 0, (reply, closing)
        assert postfix.mentions(attempt.recipient.decode()) == []  # not even in its log of the SYN
        where.gate.wait_for_log(rf"FAIL client={re.escape(attempt.src)} .*"
                                rf"recipient='{re.escape(attempt.recipient.decode())}'")


# --- urgent data and POP3 ------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_urgent_data_cannot_merge_pop3_lines(lab, mail_server, raw_quiet, where, family):
    # "CAPA\r\n" "PASS wrong\r\n" with the first LF urgent: Dovecot's TCP takes it out and
    # Dovecot reads one line, "CAPA\rPASS wrong", answering once. A reader of both lines
    # would then take the next +OK (to any command) for the PASS's: a login. Through the
    # gate (URG cleared) Dovecot reads the two lines the gate reads.
    attempt = Attempt(lab, where, family)
    tcp = attempt.raw(110)
    try:
        tcp.connect()
        assert tcp.read_line().startswith(b"+OK")
        tcp.send(b"CAPA\r\n")
        while tcp.read_line() != b".\r\n":
            pass
        tcp.send(b"USER alice\r\n")
        assert tcp.read_line().startswith(b"+OK")
        tcp.send(b"CAPA\r\nPASS wrong\r\n", flags="PAU", urg=6)
        first = tcp.read_line()
        if not where.gated:
            assert first.startswith(b"-ERR")  # to "CAPA\rPASS wrong", and nothing else
            time.sleep(3.0)  # longer than Dovecot's delay for a failed login
            assert tcp.unread() == b""
            return
        assert first == b"+OK\r\n"            # CAPA's listing...
        while tcp.read_line() != b".\r\n":
            pass
        assert tcp.read_line(timeout=20).startswith(b"-ERR")  # ...and PASS refused
        tcp.send(b"USER alice\r\n")
        assert tcp.read_line().startswith(b"+OK")
    finally:
        attempt.close()
    assert not [line for line in where.gate.log_lines() if " LOGIN client=" in line]
    assert where.counters()["urgent_cleared"] >= 1
    client = Talk(lab, attempt.src, attempt.dst)
    try:
        assert client.relay(attempt.relay)[:3] == b"550"
    finally:
        client.close()


# --- grammar Postfix accepts -------------------------------------------------------------

# Ways of writing a RCPT that Postfix 3.7 accepts (checked against the bare lab), from
# its smtpd_token.c and extract_addr(): whitespace is any isspace(), a route is cut
# off, RFC 822 comments and junk around the address are skipped. %s is the recipient.
RELAY_SPELLINGS = [
    b"RCPT TO:%s", b"RCPT TO: <%s>", b"RCPT\tTO:<%s>", b"RCPT    TO:<%s>", b"RCPT TO:<%s>   ",
    b"rcpt to:<%s>", b" RCPT TO:<%s>", b"RCPT TO:\t<%s>\x0b", b"RCPT TO:<%s> NOTIFY=NEVER",
    b"RCPT TO:<@lab.example:%s>", b"RCPT TO:@lab.example:%s", b'RCPT TO:<"%s">', b'RCPT TO:"%s"',
    b"RCPT TO:<%s (alice@lab.example)>", b"RCPT TO:<(alice@lab.example)%s>", b"RCPT TO:<<%s>>",
    b"RCPT TO:<%s>>", b"RCPT TO:%s>", b"RCPT TO:<%s>(alice@lab.example)", b"RCPT TO:<%s,>",
    b"RCPT TO:<%s.>", b"RCPT TO:alice@lab.example@%s",
]
# Spellings of a local recipient Postfix delivers: the gate must let them by.
LOCAL_SPELLINGS = [
    b"RCPT TO:alice@lab.example", b"RCPT TO: <alice@lab.example>", b"RCPT\tTO:<alice@lab.example>\t",
    b"rcpt  to:<ALICE@lab.example>  ", b'RCPT TO:<"alice"@lab.example>', b"RCPT TO:<alice@lab.example.>",
    b"RCPT TO:<@relay.example:alice@lab.example>",
]


def client_socket(lab, family: int, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket of the client host (it stays in the namespace it was made in)."""
    with lab.inside("client"):
        return socket.socket(family, kind, proto)


class Talk:
    """A plain SMTP client on a kernel socket of the client host."""

    def __init__(self, lab, src: str, dst: str, port: int = 25, timeout: float = CLIENT_TIMEOUT,
                 nodelay: bool = False) -> None:
        self.sock = client_socket(lab, AF_INET6 if ":" in dst else AF_INET)
        try:
            self.sock.settimeout(timeout)
            if nodelay:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.bind((src, 0))
            self.sock.connect((dst, port))
        except BaseException:
            self.sock.close()
            raise
        self.buf = b""

    def reply(self) -> bytes:
        """The next whole reply; what there is (maybe b"") when the peer closes."""
        while True:
            lines = self.buf.split(b"\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] != b"-":
                    end = sum(len(x) + 1 for x in lines[:i + 1])
                    out, self.buf = self.buf[:end], self.buf[end:]
                    return out
            try:
                chunk = self.sock.recv(4096)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        return self.reply()

    def relay(self, rcpt: bytes, sender: bytes = SENDER) -> bytes:
        """Greeting, EHLO, MAIL, then `rcpt` (a whole line): the reply to the first
        command refused, or to the RCPT."""
        for step in (None, b"EHLO hostile.example\r\n", b"MAIL FROM:<" + sender + b">\r\n", rcpt):
            reply = self.reply() if step is None else self.command(step)
            if not reply.startswith(b"2"):
                return reply
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_grammar_postfix_accepts_hides_no_relay(lab, mail_server, where):
    src, dst = pool(lab, AF_INET, TALK)[0], lab.server.ipv4
    refused = {}
    for spelling in RELAY_SPELLINGS:
        address = recipient()
        client = Talk(lab, src, dst)
        try:
            reply = client.relay(spelling.replace(b"%s", address) + b"\r\n")
        finally:
            client.close()
        refused[spelling] = reply[:3]
    if not where.gated:
        assert set(refused.values()) == {b"250"}, refused
    else:
        assert set(refused.values()) <= {b"550", b"554"}, refused
    for spelling in LOCAL_SPELLINGS:
        client = Talk(lab, src, dst)
        try:
            assert client.relay(spelling + b"\r\n").startswith(b"250"), spelling
        finally:
            client.close()


# --- slow drip ---------------------------------------------------------------------------------

DRIP_CLIENTS = 4
DRIP_INTERVAL = 0.1  # seconds between bytes: a RCPT line takes ~4 s


@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_slow_drip_relays_are_judged_and_stall_nobody(lab, mail_server, where):
    """A few clients drip their relay RCPT a byte a segment; inbound mail meanwhile."""
    replies: list[bytes] = []
    errors: list[BaseException] = []

    def drip(src: str, dst: str) -> None:
        try:
            client = Talk(lab, src, dst, nodelay=True)
            try:
                client.relay(b"NOOP\r\n")  # greeting, EHLO, MAIL, one command
                for byte in rcpt_line(recipient()):
                    client.sock.sendall(bytes([byte]))
                    time.sleep(DRIP_INTERVAL)
                replies.append(client.reply())
            finally:
                client.close()
        except BaseException as exc:  # reported by the test, not lost in its thread
            errors.append(exc)

    threads = [threading.Thread(target=drip, args=(pool(lab, family, TALK)[0], lab.server.address(family)))
               for family in FAMILIES for _ in range(DRIP_CLIENTS // 2)]
    for thread in threads:
        thread.start()
    before = len(mail_server.wait_for_mail("alice", 0))
    subject = f"during-drip-{uuid.uuid4().hex[:8]}"
    took = deliver(lab, pool(lab, AF_INET, INBOUND)[0], lab.server.ipv4, subject)
    for thread in threads:
        thread.join()
    assert not errors, errors
    print(f"\n[{where.mode}] slow drip: inbound session {took * 1000:.0f} ms while "
          f"{len(threads)} relays dripped")
    codes = sorted(reply[:3] for reply in replies)
    assert codes == [b"250" if not where.gated else b"550"] * len(threads), replies
    assert any(subject in m.read_text(errors="replace")
               for m in mail_server.wait_for_mail("alice", before + 1))


# --- floods ------------------------------------------------------------------------------------

SYN_FLOOD_COUNT = 2000
IDLE_FLOWS = 500
RELAY_CLIENTS = 12
RELAY_SECONDS = {"bare": 5.0, "forward": 15.0, "input": 15.0}
BASELINE_SESSIONS = 30


def deliver(lab, src: str, dst: str, subject: str) -> float:
    """One inbound message to alice; the session's duration in seconds."""
    started = time.monotonic()
    client = Talk(lab, src, dst, timeout=30.0)
    try:
        steps = [b"EHLO inbound.example\r\n", b"MAIL FROM:<sender@external.example>\r\n",
                 b"RCPT TO:<alice@lab.example>\r\n", b"DATA\r\n",
                 f"Subject: {subject}\r\n\r\n{subject}\r\n.\r\n".encode(), b"QUIT\r\n"]
        assert client.reply().startswith(b"220")
        for step, code in zip(steps, (b"250", b"250", b"250", b"354", b"250", b"221")):
            reply = client.command(step)
            assert reply.startswith(code), (step, reply)
    finally:
        client.close()
    return time.monotonic() - started


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@contextmanager
def responder(lab) -> Iterator[None]:
    """bench/responder.py in the server namespace on IDLE_PORT, both families."""
    proc = lab.spawn("server", [sys.executable, "-m", "bench.responder", "--host", "",
                                "--smtp-port", str(IDLE_PORT), "--pop3-port", str(IDLE_PORT + 1)],
                     cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            try:
                Talk(lab, lab.client.ipv4, lab.server.ipv4, IDLE_PORT, timeout=1.0).close()
                return True
            except OSError:
                return False
        wait_until(listening, 10.0, "the responder")
        yield
    finally:
        lab.stop(proc)


def syn_flood(lab, count: int) -> float:
    """`count` SYNs from random ports of the SYN_FLOOD addresses, both families, that
    nobody answers; seconds it took to send them."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    packets = []
    for i in range(count):
        family = AF_INET6 if i % 2 else AF_INET
        srcs = pool(lab, family, SYN_FLOOD)
        ip = (IPv6 if family == AF_INET6 else IP)(src=srcs[i % len(srcs)], dst=lab.server.address(family))
        packets.append((family, bytes(ip / TCP(sport=20000 + i, dport=25, flags="S", seq=i * 7919))))
    socks = {f: client_socket(lab, f, socket.SOCK_RAW, socket.IPPROTO_RAW) for f in FAMILIES}
    try:
        started = time.monotonic()
        for family, raw in packets:
            dst = lab.server.address(family)
            socks[family].sendto(raw, (dst, 0) if family == AF_INET else (dst, 0, 0, 0))
        return time.monotonic() - started
    finally:
        for sock in socks.values():
            sock.close()


@dataclass
class RelayFlood:
    """RELAY_CLIENTS threads making relay attempts until `until`."""

    lab: object
    until: float
    outcomes: dict[bytes, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, src: str, dst: str) -> None:
        while time.monotonic() < self.until:
            try:
                client = Talk(self.lab, src, dst, timeout=30.0)
                try:
                    code = client.relay(rcpt_line(recipient()))[:3]
                    if code == b"250":
                        client.command(b"QUIT\r\n")
                finally:
                    client.close()
            except OSError as exc:
                with self.lock:
                    self.errors.append(repr(exc))
                continue
            with self.lock:
                self.outcomes[code] = self.outcomes.get(code, 0) + 1


@pytest.mark.parametrize("where", WHERE, indirect=True)
def test_floods_refuse_every_relay_and_deliver_every_message(lab, mail_server, where):
    inbound = {f: pool(lab, f, INBOUND)[0] for f in FAMILIES}
    before = len(mail_server.wait_for_mail("alice", 0))
    subjects: list[str] = []

    def inbound_session(i: int) -> float:
        family = AF_INET6 if i % 2 else AF_INET
        subject = f"flood-{where.mode}-{uuid.uuid4().hex[:8]}"
        subjects.append(subject)
        return deliver(lab, inbound[family], lab.server.address(family), subject)

    baseline = [inbound_session(i) for i in range(BASELINE_SESSIONS)]
    with ExitStack() as stack:
        stack.enter_context(responder(lab))
        for family in FAMILIES:
            for src in pool(lab, family, SYN_FLOOD):
                stack.enter_context(silence_kernel(lab, "client", src))
        # Idle established flows, greeted, then left alone through both floods.
        idle = []
        for i in range(IDLE_FLOWS):
            family = AF_INET6 if i % 2 else AF_INET
            srcs = pool(lab, family, IDLE)
            client = Talk(lab, srcs[i % len(srcs)], lab.server.address(family), port=IDLE_PORT)
            stack.callback(client.close)
            assert client.reply().startswith(b"220")
            idle.append(client)
        tracked_idle = where.status().get("flows_tracked", 0)

        # The SYN flood, with inbound mail beside it.
        syn_seconds = syn_flood(lab, SYN_FLOOD_COUNT)
        during_syn = [inbound_session(i) for i in range(10)]
        status = where.status()

        # The relay flood, with inbound mail beside it.
        seconds = RELAY_SECONDS[where.mode]
        flood = RelayFlood(lab, time.monotonic() + seconds)
        threads = []
        for i in range(RELAY_CLIENTS):
            family = AF_INET6 if i % 2 else AF_INET
            src = pool(lab, family, RELAY_FLOOD)[i // 2 % len(RELAY_FLOOD)]
            threads.append(threading.Thread(target=flood.run, args=(src, lab.server.address(family))))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        during = []
        while time.monotonic() < flood.until:
            during.append(inbound_session(len(during)))
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        # Every idle flow outlived both floods.
        for client in idle:
            assert client.command(b"NOOP\r\n").startswith(b"250")

    messages = mail_server.wait_for_mail("alice", before + len(subjects), timeout=60.0)
    texts = "".join(m.read_text(errors="replace") for m in messages)
    missing = [s for s in subjects if s not in texts]
    attempts = sum(flood.outcomes.values())
    rate = attempts / elapsed
    print(f"\n[{where.mode}] idle flows: {IDLE_FLOWS} open ({tracked_idle} flows tracked)")
    print(f"[{where.mode}] SYN flood: {SYN_FLOOD_COUNT} SYNs in {syn_seconds:.2f} s; "
          f"flows tracked {status.get('flows_tracked', '-')}, evicted {status.get('flows_evicted', '-')}"
          f" (max_flows {MAX_FLOWS}); inbound during it: p99 {p99(during_syn) * 1000:.0f} ms")
    print(f"[{where.mode}] relay flood: {RELAY_CLIENTS} clients, {attempts} attempts in {elapsed:.1f} s "
          f"= {rate:.0f}/s {'refused' if where.gated else 'ACCEPTED (no gate)'}, outcomes "
          f"{ {k.decode(): v for k, v in flood.outcomes.items()} }, errors {len(flood.errors)}")
    print(f"[{where.mode}] inbound sessions: alone p50 {statistics.median(baseline) * 1000:.0f} ms "
          f"p99 {p99(baseline) * 1000:.0f} ms ({len(baseline)}); during the relay flood "
          f"p50 {statistics.median(during) * 1000:.0f} ms p99 {p99(during) * 1000:.0f} ms ({len(during)})")
    assert not missing, f"{len(missing)} of {len(subjects)} inbound messages not delivered"
    assert not flood.errors, flood.errors[:5]
    assert attempts > 0
    assert set(flood.outcomes) == {b"550" if where.gated else b"250"}, flood.outcomes
    if where.gated:
        assert status["flows_tracked"] <= MAX_FLOWS and status["flows_evicted"] > 0
