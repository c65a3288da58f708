"""A thousand recipients in one pipelined transaction, through the gate.

RFC 5321 has a server take at least 100 recipients a message; Postfix's smtpd
takes 1000 (smtpd_recipient_limit, stated in provision/main.cf.in) and a
sending MTA pipelines its RCPTs. The gate must pass all of them: it bounds
what waits for replies by bytes (engine/smtp.py, MAX_PENDING_BYTES), not by a
count such traffic reaches.

Each case runs on the bare lab first (the gw only forwards), so that what it
asserts is shown to hold without sapd-nfq, then with sapd-nfq on the gw
(forward mode, provision/gateway.sh):

- the lab's sending Postfix (provision/client-main.cf.in: up to 1000
  recipients a transaction, no DSN parameters) relays one message to 1000
  local recipients, all delivered; a capture shows that it had more than
  100 commands waiting for replies at once (Postfix writes 4 KB of commands
  before it reads replies); how long it all takes is printed for each path;
- a raw client writes MAIL FROM, 1000 RCPT TO with 64-octet local parts and
  DATA in one send(), and reads 1000 250 replies and the 354, in both IP
  families.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import PostfixLog, wait_until
from scapy.all import TCP, rdpcap

from sapd_nfq.lab import capture
from sapd_nfq.lab.client_mta import ClientMTA
from sapd_nfq.lab.gate import Gate

pytestmark = pytest.mark.lab

RECIPIENTS = 1000
DELIVERY_TIMEOUT = 300.0  # seconds for 1000 deliveries on a busy two-CPU host
CLIENT_TIMEOUT = 60.0
POLL = 0.5
SENDER = "dave@external.example"


@pytest.fixture(scope="module")
def mta(lab):
    with ClientMTA(lab) as mta:
        yield mta


@pytest.fixture(params=["bare", "gate"])
def path(request, lab):
    """Nothing on the gw but forwarding, or sapd-nfq; the gate (or None)."""
    if request.param == "bare":
        yield None
        return
    with Gate(lab, auth_ttl=60) as gate:
        yield gate


def recipients(local_part) -> list[str]:
    """1000 local addresses, tagged for this test (lab.example's users take +detail)."""
    tag = uuid.uuid4().hex[:3]
    return [f"{local_part(tag, i)}@lab.example" for i in range(RECIPIENTS)]


def sent_to(lines: list[str], wanted: set[str], extra: str = "") -> set[str]:
    """The recipients of `wanted` that Postfix log `lines` report as sent."""
    found = set()
    for line in lines:
        match = re.search(r" to=<([^>]+)>,.* status=sent", line)
        if match and match.group(1) in wanted and extra in line:
            found.add(match.group(1))
    return found


def assert_gate_passed(gate: Gate | None, offset: int, wanted: set[str]) -> None:
    if gate is None:
        return
    lines = gate.log_since(offset)
    passed = {m.group(1) for line in lines if " PASS " in line
              and (m := re.search(r"recipient='([^']+)' row='row 1", line))}
    assert passed >= wanted, f"{len(wanted - passed)} recipients not passed by the gate"
    assert not [line for line in lines if " FAIL " in line or " RESET " in line], lines[-20:]


def session_figures(pcap) -> tuple[int, float]:
    """Of an SMTP session captured at the client: the most commands it had
    sent and not yet seen answered at any one time (up to the 354 to DATA:
    message text is no command), and the seconds from its MAIL to the reply
    that queued the message."""
    sent = answered = most = 0
    counting, mail_at, queued_at = True, None, None
    seen = set()
    for packet in rdpcap(str(pcap)):
        tcp = packet[TCP]
        data = bytes(tcp.payload)
        if not data or (tcp.dport, tcp.seq) in seen:  # retransmissions count once
            continue
        seen.add((tcp.dport, tcp.seq))
        if tcp.dport == 25:
            mail_at = mail_at or (float(packet.time) if b"MAIL FROM:" in data else None)
            sent += data.count(b"\n") if counting else 0
        elif counting:
            lines = data.splitlines()
            answered += sum(1 for line in lines if line[3:4] == b" ")
            counting = not any(line.startswith(b"354 ") for line in lines)
        elif b" queued as " in data:
            queued_at = float(packet.time)
        most = max(most, sent - (answered - 1))  # the greeting answers no command
    assert mail_at is not None and queued_at is not None, "no whole transaction captured"
    return most, queued_at - mail_at


def _refused(mta: ClientMTA, offset: int) -> str | None:
    """The client MTA's first bounce or deferral since `offset`, if any."""
    return next((line for line in mta.log_since(offset)
                 if "status=bounced" in line or "status=deferred" in line), None)


def test_the_sending_postfix_delivers_to_a_thousand_local_recipients(lab, mail_server, mta, path,
                                                                      tmp_path):
    wanted = recipients(lambda tag, i: f"bob+{tag}{i:03d}")
    postfix = PostfixLog(mail_server)
    gate_offset = path.log_size() if path is not None else 0

    with capture(lab, "client", tmp_path / "smtp.pcap", f"tcp port 25 and host {lab.client.ipv4}") as pcap:
        started = time.monotonic()
        offset = mta.send(SENDER, wanted, f"to {RECIPIENTS} recipients")

        def relayed() -> set[str]:
            return sent_to(mta.log_since(offset), set(wanted), f"relay={lab.server.ipv4}[")
        done = wait_until(lambda: len(relayed()) == RECIPIENTS or _refused(mta, offset),
                          DELIVERY_TIMEOUT, "the client MTA to relay every recipient", POLL)
        assert done is True, f"the client MTA was refused: {_refused(mta, offset)}"
        relay_time = time.monotonic() - started
    waiting, transaction = session_figures(pcap)
    assert waiting > 100, f"the sending Postfix never had more than {waiting} commands waiting"
    log = mta.log_since(offset)
    assert not [line for line in log if "status=deferred" in line or "status=bounced" in line]
    # one SMTP transaction, every recipient in it
    queue_ids = {m.group(1) for line in log
                 if (m := re.search(r"status=sent \(250 2\.0\.0 Ok: queued as (\w+)\)", line))}
    assert len(queue_ids) == 1, queue_ids

    wait_until(lambda: len(sent_to(postfix.lines(), set(wanted), "relay=virtual")) == RECIPIENTS,
               DELIVERY_TIMEOUT, f"{RECIPIENTS} deliveries to maildir", POLL)
    delivery_time = time.monotonic() - started
    assert_gate_passed(path, gate_offset, set(wanted))
    print(f"\n{'gate' if path else 'bare'}: the sending Postfix's transaction to {RECIPIENTS} "
          f"recipients took {transaction:.3f} s (up to {waiting} commands awaiting replies); "
          f"relayed {relay_time:.2f} s and all delivered {delivery_time:.2f} s after submission")


class Replies:
    """SMTP replies read off a socket: each final reply's code."""

    def __init__(self, sock: socket.socket) -> None:
        self.file = sock.makefile("rb")

    def next(self) -> tuple[str, bytes]:
        """(code, text of all its lines) of the next reply; '' at end of stream."""
        text = b""
        while True:
            line = self.file.readline()
            text += line
            if not line:
                return "", text
            if line[3:4] != b"-":
                return line[:3].decode(), text


@pytest.mark.parametrize("family", [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")])
def test_a_raw_pipelined_burst_of_a_thousand_rcpts_gets_every_reply(lab, path, family):
    wanted = recipients(lambda tag, i: f"alice+{tag}{i:04d}".ljust(64, "x"))
    burst = (f"MAIL FROM:<{SENDER}>\r\n" + "".join(f"RCPT TO:<{r}>\r\n" for r in wanted)
             + "DATA\r\n").encode()
    gate_offset = path.log_size() if path is not None else 0
    source = lab.client.pool_ipv6[0] if family == AF_INET6 else lab.client.pool_ipv4[0]
    with lab.inside("client"):
        sock = socket.create_connection((lab.server.address(family), 25), CLIENT_TIMEOUT,
                                        source_address=(source, 0))
    with sock:
        replies = Replies(sock)
        assert replies.next()[0] == "220"
        sock.sendall(b"EHLO client.lab.example\r\n")
        code, ehlo = replies.next()
        assert code == "250" and b"PIPELINING" in ehlo, ehlo

        started = time.monotonic()
        sock.sendall(burst)  # one write: every command before any reply
        codes = [replies.next()[0] for _ in range(RECIPIENTS + 2)]
        took = time.monotonic() - started
        assert codes == ["250"] * (RECIPIENTS + 1) + ["354"], [c for c in codes if c != "250"]
        sock.sendall(b"Subject: a pipelined burst\r\n\r\nTo a thousand.\r\n.\r\nQUIT\r\n")
        assert replies.next()[0] == "250"
        assert replies.next()[0] == "221"
    assert len(burst) > 80_000
    assert_gate_passed(path, gate_offset, set(wanted))
    print(f"\n{'gate' if path else 'bare'}: a burst of {len(burst)} bytes, every reply "
          f"in {took:.3f} s")
