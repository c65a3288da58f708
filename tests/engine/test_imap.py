"""The IMAP machine, fed real-looking transcripts cut every way TCP can cut them.

Transcripts follow what Dovecot 2.3 sends and what curl (AUTHENTICATE PLAIN with
SASL-IR, or LOGIN), Python's imaplib (LOGIN, quoted) and mail clients (literals,
AUTHENTICATE LOGIN) send. The invariants: a login is learnt only from the tagged
OK of LOGIN or AUTHENTICATE; a literal's content is never a command or a reply;
whatever arrives, the machine parses it or raises ProtocolError; the password
shows up in no event, repr or error hint.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from login_machines import PASSWORD, PLAIN_IR, C, Harness, S, feed

from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.events import (
    LoginFailed,
    LoginSucceeded,
    Quit,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from sapd_nfq.engine.imap import IMAPMachine, _Kind

IMAP = Harness(IMAPMachine)
assert_every_cut = IMAP.assert_every_cut
assert_refused_every_cut = IMAP.assert_refused_every_cut

CAPS = b"IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS AUTH=PLAIN AUTH=LOGIN"
GREETING_LINE = b"* OK [CAPABILITY " + CAPS + b"] Dovecot (Debian) ready.\r\n"
GREETING = (S, GREETING_LINE)
STARTTLS_AT = GREETING_LINE.index(b"STARTTLS")
CAPABILITY = [(C, b"A001 CAPABILITY\r\n"),
              (S, b"* CAPABILITY " + CAPS + b"\r\nA001 OK Pre-login capabilities listed, "
                  b"post-login capabilities have more.\r\n")]
# the second STARTTLS offer, in the server stream
CAPABILITY_AT = len(GREETING_LINE) + len(b"* CAPABILITY ") + CAPS.index(b"STARTTLS")
OFFERS = [TLSOffered(STARTTLS_AT, 8), TLSOffered(CAPABILITY_AT, 8)]
LOGGED_IN = b"OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT] Logged in\r\n"
FAILED_LINE = b"NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


# --- transcripts that log in ------------------------------------------------------

IMAPLIB = [GREETING, *CAPABILITY, (C, f'A002 LOGIN alice "{PASSWORD}"\r\n'.encode()),
           (S, b"A002 " + LOGGED_IN)]
CURL_SASL_IR = [GREETING, *CAPABILITY, (C, f"A002 AUTHENTICATE PLAIN {PLAIN_IR}\r\n".encode()),
                (S, b"A002 " + LOGGED_IN)]
CURL_LOGIN = [GREETING, *CAPABILITY, (C, f"A002 LOGIN bob {PASSWORD}\r\n".encode()),
              (S, b"A002 " + LOGGED_IN)]
SASL_CONTINUED = [GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"),
                  (C, f"{PLAIN_IR}\r\n".encode()), (S, b"a " + LOGGED_IN)]
SASL_LOGIN = [GREETING, (C, b"a AUTHENTICATE LOGIN\r\n"), (S, b"+ VXNlcm5hbWU6\r\n"),
              (C, b"Ym9i\r\n"), (S, b"+ UGFzc3dvcmQ6\r\n"),
              (C, base64.b64encode(PASSWORD.encode()) + b"\r\n"), (S, b"a " + LOGGED_IN)]
SYNC_LITERALS = [GREETING, (C, b"a LOGIN {5}\r\n"), (S, b"+ OK\r\n"),
                 (C, b"alice {%d}\r\n" % len(PASSWORD)), (S, b"+ OK\r\n"),
                 (C, PASSWORD.encode() + b"\r\n"), (S, b"a " + LOGGED_IN)]
# LITERAL+: the content follows at once; it holds what would be a command and a reply
NON_SYNC = [GREETING, (C, b'a LOGIN {12+}\r\nb OK LOGOUT "x"\r\n'), (S, b"a " + LOGGED_IN)]
PIPELINED = [GREETING, (C, f"1 ID NIL\r\n2 LOGIN bob {PASSWORD}\r\n".encode()),
             (S, b'* ID ("name" "Dovecot")\r\n1 OK ID completed.\r\n2 ' + LOGGED_IN)]
BARE_LF = [GREETING, (C, f"a login bob {PASSWORD}\n".encode()), (S, b"a ok Logged in\n")]

LOGINS = {
    "imaplib LOGIN, quoted": (IMAPLIB, [*OFFERS, LoginSucceeded("alice", "LOGIN")]),
    "curl AUTHENTICATE PLAIN, SASL-IR": (
        CURL_SASL_IR, [*OFFERS, LoginSucceeded("bob", "AUTHENTICATE PLAIN")]),
    "curl LOGIN": (CURL_LOGIN, [*OFFERS, LoginSucceeded("bob", "LOGIN")]),
    "AUTHENTICATE PLAIN after +": (
        SASL_CONTINUED, [OFFERS[0], LoginSucceeded("bob", "AUTHENTICATE PLAIN")]),
    "AUTHENTICATE LOGIN": (SASL_LOGIN, [OFFERS[0], LoginSucceeded("bob", "AUTHENTICATE LOGIN")]),
    "synchronising literals": (SYNC_LITERALS, [OFFERS[0], LoginSucceeded("alice", "LOGIN")]),
    "non-synchronising literal": (NON_SYNC, [OFFERS[0], LoginSucceeded("b OK LOGOUT", "LOGIN")]),
    "pipelined": (PIPELINED, [OFFERS[0], LoginSucceeded("bob", "LOGIN")]),
    "bare LF, lower case": (BARE_LF, [OFFERS[0], LoginSucceeded("bob", "LOGIN")]),
}


@pytest.mark.parametrize("steps, expected", LOGINS.values(), ids=LOGINS.keys())
def test_login(steps, expected):
    assert_every_cut(steps, expected, settled=True)


def test_literal_user_name_is_read_whole():
    steps = [GREETING, (C, b"a LOGIN {11+}\r\nalice smith {3+}\r\npw1\r\n"), (S, b"a OK\r\n")]
    assert_every_cut(steps, [OFFERS[0], LoginSucceeded("alice smith", "LOGIN")], settled=True)


@pytest.mark.parametrize("steps, expected", LOGINS.values(), ids=LOGINS.keys())
def test_settled_machine_reads_nothing_more(steps, expected):
    machine = IMAPMachine()
    assert feed(machine, steps) == expected
    after = [(C, b"b SELECT INBOX\r\nc IDLE\r\n"), (S, b"b OK\r\nc OK\r\n+ idling\r\n"),
             (C, b"\x00" * 5000), (S, b"garbage\r\n")]
    assert feed(machine, after) == []
    assert machine.settled


# --- what is not a login ----------------------------------------------------------

FAILED = {
    "LOGIN refused": ([GREETING, (C, b"a LOGIN alice wrong\r\n"), (S, b"a " + FAILED_LINE)],
                      [LoginFailed("alice", "LOGIN")]),
    "LOGIN BAD": ([GREETING, (C, b"a LOGIN alice\r\n"), (S, b"a BAD Missing argument\r\n")],
                  [LoginFailed("alice", "LOGIN")]),
    "AUTHENTICATE refused": (
        [GREETING, (C, f"a AUTHENTICATE PLAIN {PLAIN_IR}\r\n".encode()), (S, b"a " + FAILED_LINE)],
        [LoginFailed("bob", "AUTHENTICATE PLAIN")]),
    "AUTHENTICATE cancelled": (
        [GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"), (C, b"*\r\n"),
         (S, b"a BAD Authentication aborted by client.\r\n")],
        [LoginFailed(None, "AUTHENTICATE PLAIN")]),
    "server gives up on a challenge": (
        [GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"), (S, b"a NO timeout\r\n")],
        [LoginFailed(None, "AUTHENTICATE PLAIN")]),
    "untagged OK": ([GREETING, (C, b"a LOGIN bob x\r\n"), (S, b"* OK Logged in\r\n")], []),
    "OK of another tag": (
        [GREETING, (C, b"a LOGIN bob x\r\nb NOOP\r\n"), (S, b"b OK Logged in\r\n")], []),
    "failure then a good NOOP": (
        [GREETING, (C, b"a LOGIN bob x\r\nb NOOP\r\n"),
         (S, b"a " + FAILED_LINE + b"b OK NOOP completed.\r\n")],
        [LoginFailed("bob", "LOGIN")]),
}


@pytest.mark.parametrize("steps, expected", FAILED.values(), ids=FAILED.keys())
def test_no_login(steps, expected):
    assert_every_cut(steps, [OFFERS[0], *expected])


def test_literal_content_is_never_a_command():
    # the literal holds "b LOGIN bob x": the server's OK to b answers the NOOP after it
    steps = [GREETING, (C, b"a NOOP {13}\r\n"), (S, b"+ OK\r\n"), (C, b"b LOGIN bob x\r\n"),
             (C, b"b NOOP\r\n"), (S, b"a BAD Error\r\nb OK Logged in\r\n")]
    assert_every_cut(steps, [OFFERS[0]])


def test_server_literal_content_is_never_a_reply():
    steps = [GREETING, (C, b"a LOGIN bob x\r\nb ID NIL\r\n"),
             (S, b"* ID (\"x\" {16}\r\na OK Logged in\r\n)\r\n"),
             (S, b"a NO [AUTHENTICATIONFAILED] x\r\nb OK ID completed.\r\n")]
    assert_every_cut(steps, [OFFERS[0], LoginFailed("bob", "LOGIN")])


# --- STARTTLS and LOGOUT ------------------------------------------------------------

def test_starttls_started():
    steps = [GREETING, (C, b"a STARTTLS\r\n"), (S, b"a OK Begin TLS negotiation now.\r\n")]
    assert_every_cut(steps, [OFFERS[0], StartTLSRequested(), TLSStarted()], settled=True)
    machine = IMAPMachine()
    feed(machine, steps)
    assert feed(machine, [(C, b"\x16\x03\x01\x02\x00\x01"), (S, b"\x16\x03\x03")]) == []


def test_starttls_refused_goes_on():
    steps = [GREETING, (C, b"a STARTTLS\r\n"), (S, b"a NO TLS support isn't enabled.\r\n"),
             (C, b"b LOGIN bob x\r\n"), (S, b"b OK\r\n")]
    assert_every_cut(steps, [OFFERS[0], StartTLSRequested(), LoginSucceeded("bob", "LOGIN")],
                     settled=True)


@pytest.mark.parametrize("after", [b"b LOGIN bob x\r\n", b"b", b"\r\n"])
def test_injection_after_starttls(after):
    assert_refused_every_cut([GREETING, (C, b"a STARTTLS\r\n" + after)])


def test_logout():
    steps = [GREETING, (C, b"a LOGOUT\r\n"), (S, b"* BYE Logging out\r\na OK Logout completed.\r\n")]
    assert_every_cut(steps, [OFFERS[0], Quit()], settled=True)


@pytest.mark.parametrize("greeting", [b"* PREAUTH ready\r\n", b"* BYE go away\r\n"])
def test_preauth_and_bye_greetings_settle_without_a_login(greeting):
    assert_every_cut([(S, greeting), (C, b"a LOGIN bob x\r\n"), (S, b"a OK\r\n")], [],
                     settled=True)


def test_offset_points_at_the_keyword_in_every_offer():
    stream = GREETING_LINE + CAPABILITY[1][1]
    for offer in OFFERS:
        assert stream[offer.offset:offer.offset + offer.length] == b"STARTTLS"
    # after the response code, in the free text: not an offer
    assert IMAPMachine().receive_server(b"* OK [CAPABILITY IMAP4rev1] no STARTTLS here\r\n") == []


# --- what the server could read differently -------------------------------------------

REFUSED_CLIENT = {
    "no tag": b" LOGIN bob x\r\n",
    "empty line": b"\r\n",
    "tag with *": b"a* LOGIN bob x\r\n",
    "tag with +": b"+ LOGIN bob x\r\n",
    "NUL": b"a LOGIN b\x00ob x\r\n",
    "tab": b"a\tLOGIN bob x\r\n",
    "literal glued to an atom": b"a LOGIN bob{5}\r\n",
    "binary literal": b"a LOGIN ~{5}\r\n",
    "literal for the command name": b"a {5}\r\n",
    "literal over a line": b"a LOGIN {9999+}\r\n",
    "repeated tag": b"a NOOP\r\na NOOP\r\n",
    "over max_line": b"a " + b"X" * 2050,
}


@pytest.mark.parametrize("line", REFUSED_CLIENT.values(), ids=REFUSED_CLIENT.keys())
def test_refused_client_lines(line):
    assert_refused_every_cut([GREETING, (C, line)])


REFUSED_SERVER = {
    "no greeting status": [(S, b"* CAPABILITY IMAP4rev1\r\n")],
    "tagged before the greeting": [(C, b"a NOOP\r\n"), (S, b"a OK\r\n")],
    "reply to no command": [GREETING, (S, b"a OK Logged in\r\n")],
    "unknown status": [GREETING, (C, b"a LOGIN bob x\r\n"), (S, b"a YES\r\n")],
    "+ with nothing waiting": [GREETING, (S, b"+ \r\n")],
    "OK during a challenge": [GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"),
                              (S, b"a OK\r\n")],
    "OK to a cancelled exchange": [GREETING, (C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"),
                                   (C, b"*\r\n"), (S, b"a OK\r\n")],
    "reply before the literal": [GREETING, (C, b"a LOGIN {5}\r\n"), (S, b"a NO too big\r\n")],
    "over max_line": [(S, b"* OK " + b"x" * 2100)],
}


@pytest.mark.parametrize("steps", REFUSED_SERVER.values(), ids=REFUSED_SERVER.keys())
def test_refused_server_lines(steps):
    assert_refused_every_cut(steps)


def test_bytes_held_for_a_literal_are_bounded():
    machine = IMAPMachine(max_line=200)
    feed(machine, [GREETING, (C, b"a LOGIN {5}\r\n")])
    machine.receive_client(b"x" * 200)
    with pytest.raises(ProtocolError):
        machine.receive_client(b"x")


def test_max_pending():
    machine = IMAPMachine(max_pending=2)
    feed(machine, [GREETING, (C, b"a NOOP\r\nb NOOP\r\n")])
    with pytest.raises(ProtocolError):
        machine.receive_client(b"c NOOP\r\n")


# --- credentials -----------------------------------------------------------------------

@pytest.mark.parametrize("steps, expected", [*LOGINS.values(), *FAILED.values()])
def test_password_never_shown(steps, expected):
    IMAP.assert_password_never_shown(steps)


# --- the reply table, over every (state, input) -------------------------------------------

#: client steps that put a command tagged "a" in each state
STATES = {
    _Kind.LOGIN: [(C, b"a LOGIN bob x\r\n")],
    _Kind.AUTHENTICATE: [(C, f"a AUTHENTICATE PLAIN {PLAIN_IR}\r\n".encode())],
    _Kind.CHALLENGED: [(C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n")],
    _Kind.CANCELLED: [(C, b"a AUTHENTICATE PLAIN\r\n"), (S, b"+ \r\n"), (C, b"*\r\n")],
    _Kind.STARTTLS: [(C, b"a STARTTLS\r\n")],
    _Kind.LOGOUT: [(C, b"a LOGOUT\r\n")],
    _Kind.OTHER: [(C, b"a NOOP\r\n")],
    "literal": [(C, b"a LOGIN {3}\r\n")],
    "idle": [],
}
INPUTS = [(S, b"a OK Logged in\r\n"), (S, b"a NO x\r\n"), (S, b"a BAD x\r\n"),
          (S, b"b OK Logged in\r\n"), (S, b"* OK Logged in\r\n"), (S, b"* BYE\r\n"),
          (S, b"+ \r\n"), (S, b'* ID ("a" {4}\r\n'), (S, b")\r\n"),
          (C, b"b NOOP\r\n"), (C, b"b LOGIN bob x\r\n"), (C, b"bob\r\n"), (C, b"*\r\n"),
          (C, b"x {2+}\r\n"), (C, PLAIN_IR.encode() + b"\r\n")]


@settings(max_examples=400, deadline=None)
@given(state=st.sampled_from(list(STATES)), inputs=st.lists(st.sampled_from(INPUTS), max_size=8))
def test_login_only_from_a_tagged_ok_to_a_login_command(state, inputs):
    machine = IMAPMachine()
    feed(machine, [GREETING, *STATES[state]])
    for side, data in inputs:
        try:
            events = feed(machine, [(side, data)])
        except ProtocolError:
            with pytest.raises(ProtocolError):  # an error pins the machine
                machine.receive_client(b"c NOOP\r\n")
            return
        if any(isinstance(e, LoginSucceeded) for e in events):
            # only the tagged OK of a login command: "a" as set up, or a "b LOGIN" fed
            assert side == S
            assert (data.startswith(b"a OK") and state in LOGIN_STATES) or (
                data.startswith(b"b OK") and (C, b"b LOGIN bob x\r\n") in inputs)
            assert machine.settled
            return


LOGIN_STATES = (_Kind.LOGIN, _Kind.AUTHENTICATE, _Kind.CHALLENGED, "literal")


TOKENS = [b"a LOGIN bob x\r\n", b"a AUTHENTICATE PLAIN\r\n", f"a AUTHENTICATE PLAIN {PLAIN_IR}\r\n".encode(),
          b"a STARTTLS\r\n", b"a LOGOUT\r\n", b"a OK\r\n", b"a NO\r\n", b"a BAD\r\n", b"* OK\r\n",
          b"* BYE\r\n", b"+ \r\n", b"*\r\n", b"{3}\r\n", b"{3+}\r\n", b"x {0}\r\n", b'"', b"(",
          b"\r\n", b"\n", b"\r", b" ", b"\x00", b"~{1}\r\n", b"* ID {2}\r\n"]
chunk = st.one_of(st.sampled_from(TOKENS), st.binary(max_size=12))


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([C, S]), chunk), max_size=40),
       max_line=st.sampled_from([8, 64, 2048]), max_pending=st.sampled_from([1, 3, 100]))
def test_any_bytes_parse_or_raise_protocol_error(steps, max_line, max_pending):
    IMAP.assert_parses_or_raises(steps, max_line=max_line, max_pending=max_pending)
