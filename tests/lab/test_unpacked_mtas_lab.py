"""The gate in front of Sendmail (the seed's MTA) and Exim (Debian's default).

Each runs in the server namespace beside Postfix, on an address of its own
(sapd_nfq/lab/sendmail.py, exim.py); the gate reads the lab's virtusertable
(for Sendmail, the text file its map was compiled from) and tells the MTA
from its greeting. Shown against each:

- what the MTA itself answers to the command a refused RCPT becomes for it
  (asked from inside the server, no gate): Sendmail `504 5.3.0 HELP topic
  "..." unknown` to `HELP`, Exim `501 ...: recipient address must contain a
  domain` to a RCPT of a bare local part; the transaction kept;
- the relay table's rows through the gate;
- one recipient refused in place, pipelined in one segment and by the
  lab's sending Postfix: the local copies arrive in the MTA's mailboxes;
- the queue id of a message the MTA took on the gate's QUEUED line, with the
  client's port of the recipient's PASS line;
- hostile grammar: a bare LF, a source route, odd case and whitespace,
  each refused in place while the session goes on; `%` and `!` routing and
  a second address, which the gate's grammar will not guess at, end
  the session as before.
"""

from __future__ import annotations

import re
import socket
import uuid
from socket import AF_INET

import pytest
from lab_gate import CLIENT_TIMEOUT, raw_transaction, try_rcpt, wait_until

from sapd_nfq.engine.refusal import FORMS, MTA, REPLY
from sapd_nfq.lab.client_mta import ClientMTA

pytestmark = pytest.mark.lab

SENDER = "alice@lab.example"
OUTSIDE = "dave@external.example"


@pytest.fixture(scope="module", params=["sendmail", "exim"])
def mta(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def gate(make_gate, mta):
    return make_gate(virtusertable=str(mta.virtusertable))


#: what each MTA answers to its form of a refused RCPT line (`HELP topic`,
#: `RCPT TO:local-part`); Sendmail lowercases the topic
ANSWERS = {
    "sendmail": lambda line: b'504 5.3.0 HELP topic "%s" unknown\r\n' % line[5:15].lower(),
    "exim": lambda line: b"501 %s: recipient address must contain a domain\r\n" % line[8:],
}


def converse(lab, host: str, source: str | None, server: str, lines: list[bytes]) -> list[bytes]:
    """Greeting and EHLO, then each line written alone and its reply read."""
    with lab.inside(host):
        sock = socket.socket()
    sock.settimeout(CLIENT_TIMEOUT)
    if source:
        sock.bind((source, 0))
    sock.connect((server, 25))
    reader = sock.makefile("rb")
    try:
        reader.readline()
        sock.sendall(b"EHLO client.lab.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        replies = []
        for line in lines:
            sock.sendall(line)
            reply = reader.readline()
            while reply[3:4] == b"-":
                reply += reader.readline()
            replies.append(reply)
        return replies
    finally:
        reader.close()
        sock.close()


def test_the_mta_refuses_the_rewritten_command_and_keeps_the_transaction(lab, mta):
    rewritten = FORMS[MTA(mta.name)].command(len(b"RCPT TO:<" + OUTSIDE.encode() + b">"))
    replies = converse(lab, "server", None, mta.address, [
        b"MAIL FROM:<" + SENDER.encode() + b">\r\n", rewritten + b"\r\n",
        b"RCPT TO:<alice@lab.example>\r\n", b"QUIT\r\n"])
    print(mta.name, "answered:", replies[1])
    assert replies[1] == ANSWERS[mta.name](rewritten)
    assert len(replies[1]) >= len(REPLY) + 2  # room for the 550
    assert replies[2].startswith(b"250")


@pytest.mark.parametrize(("sender", "recipient", "login", "refused"), [
    ("dave@external.example", "alice@lab.example", False, False),   # row 1
    ("alice@lab.example", "dave@external.example", True, False),    # row 2
    ("alice@lab.example", "dave@external.example", False, True),    # row 3
    ("dave@external.example", "erin@external.example", True, True),  # row 4
    ("dave@external.example", "ann@lab.example", False, True),       # error: in the map: not local
])
def test_the_relay_table_in_front_of_the_mta(lab, mta, gate, fresh,
                                              sender, recipient, login, refused):
    source = fresh()
    if login:
        gate.cli("auth", "add", source)
    outcome = try_rcpt(lab, source, mta.address, sender, recipient)
    if refused:
        assert outcome is not None and outcome.code == 550
        assert outcome.text == REPLY[4:].decode().rstrip(), outcome
    else:
        assert outcome is None


def delivered(mta, user: str, tag: str) -> bytes:
    return wait_until(lambda: next((m for m in mta.mailbox(user) if tag.encode() in m), None),
                      60, f"the message tagged {tag} in {user}'s {mta.name} mailbox")


def test_one_segment_local_refused_local_through_the_mta(lab, mta, gate, fresh):
    tag = uuid.uuid4().hex[:8]
    rcpts = [f"alice+{tag}@lab.example", OUTSIDE, f"bob+{tag}@lab.example"]
    replies = raw_transaction(lab, AF_INET, fresh(), mta.address, SENDER, rcpts, tag)
    assert [r[:3] for r in replies] == [b"250", b"250", b"550", b"250", b"354", b"250", b"221"]
    assert replies[2].startswith(REPLY) and replies[2].endswith(b"\r\n")
    assert replies[2][len(REPLY):-2].strip() == b""  # padded with spaces to the MTA's length
    for user in ("alice", "bob"):
        delivered(mta, user, tag)


def test_the_sending_postfix_through_the_gate_to_the_mta(lab, mta, gate):
    tag = uuid.uuid4().hex[:8]
    rcpts = [f"alice+{tag}@lab.example", OUTSIDE, f"bob+{tag}@lab.example"]
    with ClientMTA(lab, relayhost=mta.address) as sending:
        offset = sending.send(SENDER, rcpts, f"via {mta.name} {tag}")
        statuses = {r: sending.wait_for_status(r, offset) for r in rcpts}
        log = sending.log_since(offset)
    assert "status=bounced" in statuses[OUTSIDE]
    # the MTA's longer reply is padded with spaces, which Postfix keeps in its log
    assert re.search(rf"said: {REPLY.decode()} *\(in reply to RCPT TO command\)",
                     statuses[OUTSIDE]), statuses[OUTSIDE]
    assert all("status=sent" in statuses[r] for r in (rcpts[0], rcpts[2])), statuses
    assert not [line for line in log if "status=deferred" in line], log
    for user in ("alice", "bob"):
        delivered(mta, user, tag)


@pytest.mark.parametrize("line", [
    b"RCPT TO:<dave@external.example>\n",                 # bare LF ends the command
    b"RCPT TO:<@lab.example:dave@external.example>\r\n",  # a source route: judged by its mailbox
    b"rcpt to:<DAVE@EXTERNAL.EXAMPLE>\r\n",
    b"RCPT\tTO:<dave@external.example>\r\n",
])
def test_hostile_grammar_is_refused_in_place_and_the_session_goes_on(
        lab, mta, gate, fresh, line):
    replies = converse(lab, "client", fresh(), mta.address, [
        b"MAIL FROM:<dave@external.example>\r\n", line, b"RCPT TO:<alice@lab.example>\r\n",
        b"RSET\r\n", b"QUIT\r\n"])
    assert replies[1].startswith(b"550 5.7.1 "), replies
    assert replies[2].startswith(b"250") and replies[4].startswith(b"221"), replies


@pytest.mark.parametrize("line", [
    b"RCPT TO:<dave%external.example@lab.example>\r\n",   # % routing, which Sendmail follows
    b"RCPT TO:<external.example!dave@lab.example>\r\n",   # ! routing
    b"RCPT TO:<alice@lab.example>,<dave@external.example>\r\n",  # two addresses
])
def test_addresses_the_gate_cannot_read_as_the_mta_does_refuse_the_session(
        lab, mta, gate, fresh, line):
    replies = converse(lab, "client", fresh(), mta.address, [
        b"MAIL FROM:<dave@external.example>\r\n", line, b"RCPT TO:<alice@lab.example>\r\n"])
    assert replies[1].startswith(b"554 5.7.1 ") and replies[2] == b"", replies


#: each MTA's reply to a message it took, and the queue id in it
QUEUED_AS = {"sendmail": rb"250 2\.0\.0 (\w+) Message accepted for delivery",
             "exim": rb"250 OK id=([\w-]+)"}


def test_the_decision_log_names_the_mtas_queue_id(lab, mta, gate, fresh, request):
    source = fresh()
    replies = raw_transaction(lab, AF_INET, source, mta.address, "carol@external.example",
                              ["bob@lab.example"], f"queue-id {uuid.uuid4().hex[:8]}")
    queued = re.match(QUEUED_AS[request.node.callspec.params["mta"]], replies[-2])
    assert queued, replies
    line = gate.wait_for_log(rf"QUEUED client={re.escape(source)} ")
    port = re.search(r" client_port=(\d+) ", line)[1]
    assert f" server={mta.address} server_port=25 " in line
    assert line.endswith(f" queue_id={queued[1].decode()}")
    gate.wait_for_log(rf"PASS client={re.escape(source)} client_port={port} .*recipient='bob@lab.example'")
