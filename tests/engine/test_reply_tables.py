"""The three machines' reply tables, over every (what waits, what the server says).

Each machine says what a reply does to the command it answers in one table,
`(kind of command, status) -> action`, and anything the table leaves out is a
protocol error. For each table: its holes are listed here, so an edit that
opens or closes one shows up; and every pair is played against the machine,
which must raise exactly where the table has a hole.
"""

from __future__ import annotations

import base64

import pytest

from sapd_nfq.engine import imap, pop3, smtp
from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.machine import PinnedMachine

C, S = "client", "server"
PLAIN_IR = base64.b64encode(b"\0bob\0pw")


def play(machine: PinnedMachine, steps: list[tuple[str, bytes]]) -> None:
    for side, data in steps:
        (machine.receive_client if side == C else machine.receive_server)(data)


def refuses(machine: PinnedMachine, setup: list[tuple[str, bytes]], reply: bytes) -> bool:
    play(machine, setup)
    try:
        machine.receive_server(reply)
    except ProtocolError:
        return True
    return False


# --- SMTP: looked up by the exact code, then by its class --------------------------

SMTP_HELLO = [(S, b"220 mx ESMTP\r\n"), (C, b"EHLO c\r\n"), (S, b"250-mx\r\n250 CHUNKING\r\n")]
SMTP_STATES = {
    smtp._Cmd.GREETING: [],
    smtp._Cmd.MAIL: [*SMTP_HELLO, (C, b"MAIL FROM:<a@b.example>\r\n")],
    smtp._Cmd.RCPT: [*SMTP_HELLO, (C, b"RCPT TO:<c@d.example>\r\n")],
    smtp._Cmd.DATA: [*SMTP_HELLO, (C, b"DATA\r\n")],
    smtp._Cmd.DOT: [*SMTP_HELLO, (C, b"DATA\r\n"), (S, b"354 go\r\n"), (C, b"x\r\n.\r\n")],
    smtp._Cmd.BDAT: [*SMTP_HELLO, (C, b"BDAT 3\r\nabc")],
    smtp._Cmd.BDAT_LAST: [*SMTP_HELLO, (C, b"BDAT 3 LAST\r\nabc")],
    smtp._Cmd.STARTTLS: [*SMTP_HELLO, (C, b"STARTTLS\r\n")],
    smtp._Cmd.AUTH: [*SMTP_HELLO, (C, b"AUTH PLAIN " + PLAIN_IR + b"\r\n")],
    smtp._Cmd.EHLO: [*SMTP_HELLO[:1], (C, b"EHLO c\r\n")],
    smtp._Cmd.HELO: [*SMTP_HELLO[:1], (C, b"HELO c\r\n")],
    smtp._Cmd.RSET: [*SMTP_HELLO, (C, b"RSET\r\n")],
    smtp._Cmd.RSET_ARGS: [*SMTP_HELLO, (C, b"RSET x\r\n")],
    smtp._Cmd.OTHER: [*SMTP_HELLO, (C, b"NOOP\r\n")],
}
SMTP_CODES = ["199", "220", "235", "250", "300", "334", "354", "421", "550"]


def smtp_holes() -> set[tuple[smtp._Cmd, str]]:
    """(command, code class) pairs no reply of that class answers, exact codes aside."""
    return {(cmd, cls) for cmd in smtp._Cmd for cls in "12345" if (cmd, cls) not in smtp._REPLIES}


def test_smtp_table_holes():
    expected = {(cmd, "1") for cmd in smtp._Cmd} | {(cmd, "3") for cmd in smtp._Cmd}
    # STARTTLS and AUTH succeed only with their own codes: 220, and 235 (or 334 to go on)
    expected |= {(smtp._Cmd.STARTTLS, "2"), (smtp._Cmd.AUTH, "2")}
    assert smtp_holes() == expected
    exact = {(cmd, code) for cmd, code in smtp._REPLIES if len(code) == 3}
    assert exact == {(smtp._Cmd.DATA, "354"), (smtp._Cmd.STARTTLS, "220"),
                     (smtp._Cmd.AUTH, "334"), (smtp._Cmd.AUTH, "235")}


@pytest.mark.parametrize("cmd", SMTP_STATES, ids=lambda c: c.name)
@pytest.mark.parametrize("code", SMTP_CODES)
def test_smtp_machine_follows_its_table(cmd, code):
    assert set(SMTP_STATES) == set(smtp._Cmd)
    hole = smtp._lookup(cmd, code) is None
    assert refuses(smtp.SMTPMachine(), SMTP_STATES[cmd], code.encode() + b" x\r\n") is hole


# --- POP3 -----------------------------------------------------------------------

POP3_GREETING = (S, b"+OK ready\r\n")
POP3_STATES = {
    pop3._Kind.GREETING: [],
    pop3._Kind.USER: [POP3_GREETING, (C, b"USER bob\r\n")],
    pop3._Kind.PASS: [POP3_GREETING, (C, b"USER bob\r\n"), (S, b"+OK\r\n"), (C, b"PASS x\r\n")],
    pop3._Kind.APOP: [POP3_GREETING, (C, b"APOP bob 0123\r\n")],
    pop3._Kind.AUTH: [POP3_GREETING, (C, b"AUTH PLAIN\r\n")],
    pop3._Kind.AUTH_ANSWERED: [POP3_GREETING, (C, b"AUTH PLAIN " + PLAIN_IR + b"\r\n")],
    pop3._Kind.AUTH_CANCELLED: [POP3_GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"), (C, b"*\r\n")],
    pop3._Kind.CHALLENGE: [POP3_GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n")],
    pop3._Kind.STLS: [POP3_GREETING, (C, b"STLS\r\n")],
    pop3._Kind.QUIT: [POP3_GREETING, (C, b"QUIT\r\n")],
    pop3._Kind.OTHER: [POP3_GREETING, (C, b"NOOP\r\n")],
}
POP3_REPLIES = {pop3._Status.OK: b"+OK\r\n", pop3._Status.ERR: b"-ERR\r\n", pop3._Status.MORE: b"+ \r\n"}


def test_pop3_table_holes():
    K, St = pop3._Kind, pop3._Status
    holes = {(kind, status) for kind in K for status in St if (kind, status) not in pop3._REPLIES}
    # a SASL challenge answers only AUTH; a +OK before any SASL response, to a
    # cancelled exchange or while the server awaits a response is no login
    assert holes == {*((kind, St.MORE) for kind in K if kind not in (K.AUTH, K.AUTH_ANSWERED)),
                     (K.AUTH, St.OK), (K.AUTH_CANCELLED, St.OK), (K.CHALLENGE, St.OK)}


@pytest.mark.parametrize("kind", POP3_STATES, ids=lambda k: k.name)
@pytest.mark.parametrize("status", POP3_REPLIES, ids=lambda s: s.name)
def test_pop3_machine_follows_its_table(kind, status):
    assert set(POP3_STATES) == set(pop3._Kind)
    hole = (kind, status) not in pop3._REPLIES
    assert refuses(pop3.POP3Machine(), POP3_STATES[kind], POP3_REPLIES[status]) is hole


# --- IMAP: the tagged reply -------------------------------------------------------

IMAP_GREETING = (S, b"* OK ready\r\n")
IMAP_STATES = {
    imap._Kind.LOGIN: [IMAP_GREETING, (C, b"a LOGIN bob x\r\n")],
    imap._Kind.AUTHENTICATE: [IMAP_GREETING, (C, b"a AUTHENTICATE PLAIN " + PLAIN_IR + b"\r\n")],
    imap._Kind.CHALLENGED: [IMAP_GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n")],
    imap._Kind.CANCELLED: [IMAP_GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"),
                           (C, b"*\r\n")],
    imap._Kind.STARTTLS: [IMAP_GREETING, (C, b"a STARTTLS\r\n")],
    imap._Kind.LOGOUT: [IMAP_GREETING, (C, b"a LOGOUT\r\n")],
    imap._Kind.OTHER: [IMAP_GREETING, (C, b"a NOOP\r\n")],
}


def test_imap_table_holes():
    K, St = imap._Kind, imap._Status
    holes = {(kind, status) for kind in K for status in St if (kind, status) not in imap._TAGGED}
    # an OK while the server awaits a response, or to a cancelled exchange, is no login
    assert holes == {(K.CHALLENGED, St.OK), (K.CANCELLED, St.OK)}


@pytest.mark.parametrize("kind", IMAP_STATES, ids=lambda k: k.name)
@pytest.mark.parametrize("status", imap._Status, ids=lambda s: s.name)
def test_imap_machine_follows_its_table(kind, status):
    assert set(IMAP_STATES) == set(imap._Kind)
    hole = (kind, status) not in imap._TAGGED
    reply = b"a " + status.value.encode() + b" x\r\n"
    assert refuses(imap.IMAPMachine(), IMAP_STATES[kind], reply) is hole
