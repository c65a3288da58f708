"""Big packets: links with jumbo frames and with offloads on, through the gate.

Every lab link runs MTU 9000 (a data-centre LAN) or 65535 (the most a veth
takes), with TSO, checksum offload and GRO on, so that the gateway receives
super-packets of up to 64 KB. A multi-megabyte message arrives byte for
byte, a large mailbox comes back by POP3 RETR, and a relay is still refused.
"""

from __future__ import annotations

import base64
import random
import uuid
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import EXTERNAL, LOCAL, SourcePOP3, assert_relay_refused, external, smtp_session

pytestmark = pytest.mark.lab

FAMILIES = [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")]
MODES = [pytest.param("forward", id="forward"), pytest.param("input", id="input")]
JUMBO = [pytest.param((9000, True), id="mtu9000-offloads"),
         pytest.param((65535, True), id="mtu65535-offloads")]
# With offloads on, the MTA receives super-packets and acknowledges each with one ACK:
# uploads longer than the bytes a stream may keep unacknowledged (4 MiB) need the gate to
# learn those ACKs, though the rules let most pure ACKs by the queue.
LINKS = [pytest.param((1500, True), id="mtu1500-offloads"), *JUMBO]
MESSAGE_SIZE = 9 * 1024 * 1024  # twice what a stream may keep unacknowledged, and more
BIG_TIMEOUT = 60.0  # seconds a client waits for one reply (it takes well under one here)


def body(size: int, seed: str) -> list[bytes]:
    """Lines of base64 text, `size` bytes or a little more, the same for the same seed."""
    rng = random.Random(seed)
    raw = rng.randbytes(size * 3 // 4)
    text = base64.encodebytes(raw)  # 76-character lines
    return text.splitlines()


def send_big(lab, source: str, server: str, recipient: str, subject: str) -> list[bytes]:
    """Send a MESSAGE_SIZE message through the gate; its body's lines."""
    lines = body(MESSAGE_SIZE, subject)
    message = (f"From: <{EXTERNAL}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\n".encode()
               + b"\r\n".join(lines) + b"\r\n")
    smtp = smtp_session(lab, source, server, BIG_TIMEOUT)
    try:
        assert smtp.sendmail(EXTERNAL, [recipient], message) == {}
    finally:
        smtp.close()
    return lines


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("links", LINKS, indirect=True)
def test_a_multi_megabyte_message_arrives_byte_for_byte(lab, mail_server, make_gate, fresh,
                                                        links, mode, family):
    gate = make_gate(mode)
    source, server = fresh(family), lab.server.address(family)
    subject = f"big-{uuid.uuid4().hex[:10]}"
    before = len(mail_server.wait_for_mail("alice", 0))
    lines = send_big(lab, source, server, LOCAL, subject)
    delivered = [m for m in mail_server.wait_for_mail("alice", before + 1)
                 if subject.encode() in m.read_bytes()[:4096]]
    assert len(delivered) == 1
    assert b"\n".join(lines) + b"\n" in delivered[0].read_bytes()  # local(8) writes LF
    _, status = gate.status()
    assert status["workers"][0]["receive"]["gso"] is True
    # super-packets reached the engine whole: fewer than MTU-9000 segments would be
    assert status["workers"][0]["counters"]["packets"] < MESSAGE_SIZE / 8948


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("links", JUMBO, indirect=True)
def test_a_large_mailbox_comes_back_by_pop3_retr(lab, mail_server, make_gate, fresh,
                                                  links, family):
    make_gate()
    source, server = fresh(family), lab.server.address(family)
    subject = f"mailbox-{uuid.uuid4().hex[:10]}"
    before = len(mail_server.wait_for_mail("bob", 0))
    lines = send_big(lab, source, server, "bob@lab.example", subject)
    mail_server.wait_for_mail("bob", before + 1)
    with lab.inside("client"):
        pop = SourcePOP3(server, source, timeout=BIG_TIMEOUT)
    try:
        pop.user("bob")
        pop.pass_(mail_server.users["bob"])
        ours = []
        for entry in pop.list()[1]:
            number, size = map(int, entry.split())
            if size > MESSAGE_SIZE:
                text = pop.retr(number)[1]
                if f"Subject: {subject}".encode() in text:
                    ours.append(text)
                pop.dele(number)  # bob's mailbox stays small for the tests after
    finally:
        pop.quit()
    assert len(ours) == 1 and ours[0][-len(lines):] == lines


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("links", JUMBO, indirect=True)
def test_a_relay_is_refused(lab, mail_server, make_gate, fresh, links, mode, family):
    gate = make_gate(mode)
    source, server = fresh(family), lab.server.address(family)
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
