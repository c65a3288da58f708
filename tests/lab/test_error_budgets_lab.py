"""A refusal in place spends none of the MTA's budget for broken clients.

Against each of Postfix, Sendmail and Exim, through the gate (forward mode),
from a client that never logged in: one transaction written in one send()
with 25 refused recipients among 5 local ones, then the message. Shown:

- every local recipient gets 250 and the message is queued and delivered
  in that session; every refused one gets a 550 whose text tells the user
  to log in; the session ends with the client's QUIT, not the MTA's 421;
- the MTA counted no error: Postfix's disconnect line holds no failed
  command (its error sleep starts only past `smtpd_soft_error_limit` errors,
  so no reply was delayed) and 25 NOOPs; Exim's log has no dropped call,
  rejection or syntax error; Sendmail answered every HELP (it counts NOOP
  and unknown commands, not HELP).

A sending Postfix and a sending Exim (which sends the message with BDAT,
CHUNKING) relaying such a message to the lab's Postfix deliver the 5 local
copies and bounce exactly the 25 refused recipients, deferring none.

As a control, the gate told to send every MTA an unknown verb (`mta =
"other"`, the refusal before MTAs were told apart) loses the Exim session
after its third unknown command: the check above can fail.
"""

from __future__ import annotations

import re
import uuid
from socket import AF_INET

import pytest
from lab_gate import PostfixLog, raw_transaction, relay_denied, wait_until

from sapd_nfq.lab.client_mta import ClientMTA
from sapd_nfq.lab.exim import EximClient

pytestmark = pytest.mark.lab

SENDER = "dave@external.example"
LOCALS = 5
REFUSED = 25


def transaction() -> tuple[str, list[str], list[str]]:
    """A tag, the 30 recipients in the order sent, and the 5 local ones."""
    tag = uuid.uuid4().hex[:8]
    rcpts, locals_ = [], []
    for i in range(LOCALS + REFUSED):
        if i % 6 == 0:
            local = f"{'alice' if i % 12 == 0 else 'bob'}+{tag}-{i}@lab.example"
            locals_.append(local)
            rcpts.append(local)
        else:
            rcpts.append(f"user{i}-{tag}@external{i}.example")
    return tag, rcpts, locals_


def assert_answered(replies: list[bytes], rcpts: list[str], locals_: list[str]) -> None:
    """250 to MAIL and each local RCPT, a 550 telling to log in to each other,
    354, the message queued, and 221 to QUIT."""
    assert replies[0].startswith(b"250"), replies[0]
    for rcpt, reply in zip(rcpts, replies[1:]):
        if rcpt in locals_:
            assert reply.startswith(b"250"), (rcpt, reply)
        else:
            assert reply.startswith(b"550 ") and b"log in" in reply.lower(), (rcpt, reply)
    assert [r[:3] for r in replies[len(rcpts) + 1:]] == [b"354", b"250", b"221"], replies


def test_postfix(lab, mail_server, make_gate, fresh):
    make_gate()
    tag, rcpts, locals_ = transaction()
    log, source = PostfixLog(mail_server), fresh()
    replies = raw_transaction(lab, AF_INET, source, lab.server.ipv4, SENDER, rcpts, tag)
    assert_answered(replies, rcpts, locals_)
    for local in locals_:
        log.wait_for(rf"to=<{re.escape(local)}>.* status=sent", timeout=60)
    closing = log.disconnect(source, timeout=30)
    assert not re.search(r"=\d+/\d+", closing), closing  # no command failed: no error counted
    assert f" rcpt={LOCALS} " in closing and f" noop={REFUSED} " in closing, closing


def test_sendmail(lab, sendmail, make_gate, fresh):
    make_gate(virtusertable=str(sendmail.virtusertable))
    tag, rcpts, locals_ = transaction()
    replies = raw_transaction(lab, AF_INET, fresh(), sendmail.address, SENDER, rcpts, tag)
    assert_answered(replies, rcpts, locals_)
    for user in ("alice", "bob"):
        wait_until(lambda user=user: [m for m in sendmail.mailbox(user) if tag.encode() in m],
                   60, f"the message tagged {tag} in {user}'s Sendmail mailbox")


def exim_troubles(lines: list[str]) -> list[str]:
    return [line for line in lines
            if re.search(r"dropped|too many|rejected|syntax error|protocol error", line)]


def test_exim(lab, exim, make_gate, fresh):
    make_gate()
    tag, rcpts, locals_ = transaction()
    offset = exim.log.size()
    replies = raw_transaction(lab, AF_INET, fresh(), exim.address, SENDER, rcpts, tag)
    assert_answered(replies, rcpts, locals_)
    for local in locals_:
        exim.log.wait_for(lambda lines, local=local: next(
            (line for line in lines if re.search(rf" [=-]> \S+ <{re.escape(local)}>", line)),
            None), offset, 60, f"Exim's delivery to {local}")
    assert not exim_troubles(exim.log.since(offset)), exim.log.since(offset)


def test_the_unknown_verb_spends_exim_s_budget(lab, exim, make_gate, fresh):
    make_gate(mta="other")
    tag, rcpts, locals_ = transaction()
    offset = exim.log.size()
    replies = raw_transaction(lab, AF_INET, fresh(), exim.address, SENDER, rcpts, tag)
    with pytest.raises(AssertionError):
        assert_answered(replies, rcpts, locals_)
    dropped = exim.log.wait_for(lambda lines: exim_troubles(lines) or None, offset, 30,
                                "Exim dropping the call")
    assert "too many unrecognized commands" in dropped[0], dropped


def test_a_sending_postfix_bounces_exactly_the_refused_recipients(lab, mail_server, make_gate):
    make_gate()
    tag, rcpts, locals_ = transaction()
    with ClientMTA(lab) as sending:
        offset = sending.send(SENDER, rcpts, f"thirty recipients {tag}")
        statuses = {r: sending.wait_for_status(r, offset, timeout=60) for r in rcpts}
    for rcpt, status in statuses.items():
        if rcpt in locals_:
            assert "status=sent" in status, status
        else:
            assert "status=bounced" in status and relay_denied(status), status


def test_a_sending_exim_bounces_exactly_the_refused_recipients(lab, mail_server, make_gate):
    make_gate()
    tag, rcpts, locals_ = transaction()
    sending = EximClient(lab)
    sending.setup()
    log = sending.send(SENDER, rcpts, f"thirty recipients {tag}")
    # `=>` and `->` delivered (K: by BDAT, CHUNKING), `**` bounced, `==` deferred;
    # the bounce itself goes to a blackhole
    delivered = [line for line in log if re.search(r" [=-]> .* R=relayhost ", line)]
    bounced = [line for line in log if " ** " in line]
    assert sorted(re.search(r"[=-]> (\S+)", line)[1] for line in delivered) == sorted(locals_), log
    assert all(" K " in line for line in delivered), delivered
    assert sorted(re.search(r"\*\* (\S+)", line)[1] for line in bounced) == sorted(
        set(rcpts) - set(locals_)), log
    assert all(relay_denied(line) for line in bounced), bounced
    assert not [line for line in log if " == " in line], log  # nothing deferred
