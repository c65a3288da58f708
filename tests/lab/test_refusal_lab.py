"""One recipient refused, the message delivered to the others (refusal = "recipient").

The gate overwrites the refused RCPT with a NOOP, which the lab's Postfix
answers `250 2.0.0 Ok` without counting an error (`noop=1` in its
disconnect line, no failed command), and that reply with `550 Log in.`, so:

- the lab's sending Postfix, pipelining refused, local, refused, local in
  one transaction, delivers both local copies (read back from the
  maildirs), bounces only the refused recipients with "said: 550 Log in.",
  and defers nothing; the gate logs their FAILs and no RESET;
- smtplib, one command at a time, and a raw client that writes the whole
  transaction in one send() (IPv4 and IPv6) read 250, 550 Log in., 250 and
  the message goes through;
- `refusal = "session"` keeps today's refusal of the whole session.
"""

from __future__ import annotations

import email
import re
import uuid
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import PostfixLog, raw_transaction, smtp_session, wait_until

from sapd_nfq.engine.refusal import SHORT_REPLY
from sapd_nfq.lab.client_mta import ClientMTA

pytestmark = pytest.mark.lab

SENDER = "alice@lab.example"
OUTSIDE = "dave@external.example"


def recipients() -> tuple[str, list[str]]:
    """A tag for this test and local, refused, local recipients carrying it."""
    tag = uuid.uuid4().hex[:8]
    return tag, [f"alice+{tag}@lab.example", OUTSIDE, f"bob+{tag}@lab.example"]


def delivered(mail_server, user: str, tag: str, timeout: float = 60.0) -> email.message.Message:
    """The message tagged `tag` in `user`'s maildir, once it is there."""
    def found():
        for path in mail_server.wait_for_mail(user, 1, timeout):
            message = email.message_from_bytes(path.read_bytes())
            if tag in (message["Subject"] or ""):
                return message
        return None

    return wait_until(found, timeout, f"the message tagged {tag} in {user}'s maildir")


def decisions(gate, rcpts: list[str]) -> list[tuple[str, str | None]]:
    """The gate's PASS and FAIL for `rcpts`, and every RESET, in order,
    once it has logged a FAIL (each test has one)."""
    gate.wait_for_log(" FAIL ", timeout=30)
    found = []
    for line in gate.log_lines():
        event = re.search(r" (PASS|FAIL|RESET) ", line)
        recipient = re.search(r" recipient='([^']*)'", line)
        if event and (event[1] == "RESET" or (recipient and recipient[1] in rcpts)):
            found.append((event[1], recipient[1] if recipient else None))
    return found


def test_the_sending_postfix_delivers_the_local_copies_and_bounces_only_the_refused(
        lab, mail_server, make_gate):
    gate = make_gate()
    tag, rcpts = recipients()
    # Postfix's queue manager sorts recipients by domain, then local part: an
    # unknown lab.example address (not local: row 3) goes between the two
    # local ones, and the external one first.
    unknown = f"ann+{tag}@lab.example"
    server_log = PostfixLog(mail_server)
    with ClientMTA(lab) as mta:
        offset = mta.send(SENDER, [*rcpts, unknown], f"four recipients {tag}")
        statuses = {r: mta.wait_for_status(r, offset) for r in [*rcpts, unknown]}
        log = mta.log_since(offset)

    for refused in (OUTSIDE, unknown):
        assert "status=bounced" in statuses[refused], statuses[refused]
        assert re.search(rf"said: {re.escape(SHORT_REPLY.decode())} *\(in reply to RCPT TO command\)",
                         statuses[refused]), statuses[refused]
    for local in (rcpts[0], rcpts[2]):
        assert "status=sent" in statuses[local], statuses[local]
        assert "5.7.1" not in statuses[local]
    assert not [line for line in log if "status=deferred" in line], log
    for user in ("alice", "bob"):
        assert delivered(mail_server, user, tag)["Subject"].endswith(tag)

    assert decisions(gate, [*rcpts, unknown]) == [
        ("FAIL", OUTSIDE), ("PASS", rcpts[0]), ("FAIL", unknown), ("PASS", rcpts[2])]
    # What Postfix received: two recipients and two NOOPs, no command failed (the
    # bounce to alice may come first, in a session of its own).
    disconnect = server_log.wait_for(
        rf"disconnect from \S+\[{re.escape(lab.client.ipv4)}\] .* noop=", timeout=30)
    assert " rcpt=2 " in disconnect and " noop=2 " in disconnect, disconnect
    assert not re.search(r"=\d+/\d+", disconnect), disconnect


def test_smtplib_reads_550_for_the_refused_recipient_only(lab, mail_server, make_gate, fresh):
    gate = make_gate()
    tag, rcpts = recipients()
    smtp = smtp_session(lab, fresh(), lab.server.ipv4)
    try:
        assert smtp.mail(SENDER)[0] == 250
        replies = [smtp.rcpt(r) for r in rcpts]
        code, _ = smtp.data(f"Subject: one at a time {tag}\r\n\r\n{tag}\r\n".encode())
        smtp.quit()
    finally:
        smtp.close()
    assert [c for c, _ in replies] == [250, 550, 250]
    assert replies[1][1] == SHORT_REPLY[4:]
    assert code == 250
    for user in ("alice", "bob"):
        delivered(mail_server, user, tag)
    assert decisions(gate, rcpts) == [("PASS", rcpts[0]), ("FAIL", OUTSIDE), ("PASS", rcpts[2])]


@pytest.mark.parametrize("family", [AF_INET, AF_INET6], ids=["ipv4", "ipv6"])
def test_one_segment_with_every_command_refuses_one_recipient(
        lab, mail_server, make_gate, fresh, family):
    gate = make_gate()
    tag, rcpts = recipients()
    server = lab.server.ipv4 if family == AF_INET else lab.server.ipv6
    replies = raw_transaction(lab, family, fresh(family), server, SENDER, rcpts, tag)
    assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"250", b"354", b"250", b"221"]
    # as long as Postfix's `250 2.0.0 Ok`, CRLF where it was
    assert replies[2] == SHORT_REPLY + b" \r\n"
    for user in ("alice", "bob"):
        delivered(mail_server, user, tag)
    assert decisions(gate, rcpts) == [("PASS", rcpts[0]), ("FAIL", OUTSIDE), ("PASS", rcpts[2])]


def test_refusal_session_refuses_the_whole_session(lab, mail_server, make_gate, fresh):
    gate = make_gate(refusal="session")
    tag, rcpts = recipients()
    replies = raw_transaction(lab, AF_INET, fresh(), lab.server.ipv4, SENDER, rcpts, tag)
    # the whole burst is dropped: one 550 and the connection ends
    assert replies[0].startswith(b"550 5.7.1") and not any(replies[1:]), replies
    assert decisions(gate, rcpts) == [("PASS", rcpts[0]), ("FAIL", OUTSIDE)]
