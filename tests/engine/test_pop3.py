"""The POP3 machine, fed real-looking transcripts cut every way TCP can cut them.

Transcripts follow what Dovecot sends and what curl (AUTH PLAIN), Python's
poplib (USER/PASS) and mail clients (AUTH LOGIN, APOP) send. The invariants:
a login is learnt only from a +OK that answers PASS, APOP or AUTH's last
step; whatever arrives, the machine parses it or raises ProtocolError; the
password shows up in no event, repr or error hint.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

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
from sapd_nfq.engine.pop3 import MAX_COMMAND, POP3Machine

POP3 = Harness(POP3Machine)
assert_every_cut = POP3.assert_every_cut
assert_refused_every_cut = POP3.assert_refused_every_cut

GREETING = (S, b"+OK Dovecot (Ubuntu) ready.\r\n")
CAPA_BODY = (b"+OK\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nPIPELINING\r\nAUTH-RESP-CODE\r\n"
             b"STLS\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n")
CAPA = [(C, b"CAPA\r\n"), (S, CAPA_BODY)]
# the server-stream offset of "STLS" in GREETING + CAPA
STLS_AT = len(GREETING[1]) + CAPA_BODY.index(b"STLS")
NO_PIPELINING = [(C, b"CAPA\r\n"), (S, b"+OK\r\nTOP\r\nUSER\r\n.\r\n")]
LOGGED_IN = (S, b"+OK Logged in.\r\n")
AUTH_FAILED = (S, b"-ERR [AUTH] Authentication failed.\r\n")


# --- transcripts that log in ------------------------------------------------------

POPLIB_LOGIN = [GREETING, (C, b"USER bob\r\n"), (S, b"+OK\r\n"),
                (C, f"PASS {PASSWORD}\r\n".encode()), LOGGED_IN]
CURL_PLAIN_IR = [GREETING, *CAPA, (C, f"AUTH PLAIN {PLAIN_IR}\r\n".encode()), LOGGED_IN]
CURL_PLAIN = [GREETING, *CAPA, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"),
              (C, f"{PLAIN_IR}\r\n".encode()), LOGGED_IN]
AUTH_LOGIN = [GREETING, (C, b"AUTH LOGIN\r\n"), (S, b"+ VXNlcm5hbWU6\r\n"),
              (C, b"Ym9i\r\n"), (S, b"+ UGFzc3dvcmQ6\r\n"),
              (C, base64.b64encode(PASSWORD.encode()) + b"\r\n"), LOGGED_IN]
APOP = [(S, b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"),
        (C, b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"),
        (S, b"+OK maildrop has 1 message (369 octets)\r\n")]
PIPELINED = [GREETING, *CAPA, (C, f"USER bob\r\nPASS {PASSWORD}\r\n".encode()),
             (S, b"+OK\r\n+OK Logged in.\r\n")]
BARE_LF = [GREETING, (C, b"user bob\n"), (S, b"+OK\r\n"), (C, f"pass {PASSWORD}\n".encode()),
           LOGGED_IN]

LOGINS = {
    "poplib USER/PASS": (POPLIB_LOGIN, [LoginSucceeded("bob", "USER")]),
    "curl AUTH PLAIN with initial response": (
        CURL_PLAIN_IR, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "AUTH PLAIN")]),
    "curl AUTH PLAIN": (CURL_PLAIN, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "AUTH PLAIN")]),
    "AUTH LOGIN": (AUTH_LOGIN, [LoginSucceeded("bob", "AUTH LOGIN")]),
    "APOP": (APOP, [LoginSucceeded("mrose", "APOP")]),
    "pipelined USER/PASS": (PIPELINED, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "USER")]),
    "bare LF, lower case": (BARE_LF, [LoginSucceeded("bob", "USER")]),
}


@pytest.mark.parametrize("steps, expected", LOGINS.values(), ids=LOGINS.keys())
def test_login(steps, expected):
    assert_every_cut(steps, expected, settled=True)


@pytest.mark.parametrize("steps, expected", LOGINS.values(), ids=LOGINS.keys())
def test_settled_machine_reads_nothing_more(steps, expected):
    machine = POP3Machine()
    assert feed(machine, steps) == expected
    after = [(C, b"RETR 1\r\n"), (S, b"+OK\r\n+OK Logged in.\r\n.\r\n"), (C, b"\x00" * 5000),
             (S, b"-ERR\r\n+ \r\ngarbage\r\n")]
    assert feed(machine, after) == []
    assert machine.settled


def test_tls_offered_offset_points_at_the_keyword():
    server = b"".join(data for side, data in CURL_PLAIN_IR if side == S)
    assert server[STLS_AT:STLS_AT + 4] == b"STLS"


# --- failed logins ------------------------------------------------------------------

FAILED = {
    "USER/PASS": ([GREETING, (C, b"USER bob\r\n"), (S, b"+OK\r\n"),
                   (C, f"PASS {PASSWORD}\r\n".encode()), AUTH_FAILED],
                  [LoginFailed("bob", "USER")]),
    "AUTH PLAIN": ([GREETING, (C, f"AUTH PLAIN {PLAIN_IR}\r\n".encode()), AUTH_FAILED],
                   [LoginFailed("bob", "AUTH PLAIN")]),
    "AUTH LOGIN": ([*AUTH_LOGIN[:-1], AUTH_FAILED], [LoginFailed("bob", "AUTH LOGIN")]),
    "AUTH cancelled": ([GREETING, (C, b"AUTH LOGIN\r\n"), (S, b"+ VXNlcm5hbWU6\r\n"),
                        (C, b"*\r\n"), (S, b"-ERR Authentication aborted by client.\r\n")],
                       [LoginFailed(None, "AUTH LOGIN")]),
    "APOP": ([*APOP[:-1], (S, b"-ERR [AUTH] Authentication failed.\r\n")],
             [LoginFailed("mrose", "APOP")]),
    "PASS without USER": ([GREETING, (C, f"PASS {PASSWORD}\r\n".encode()),
                           (S, b"-ERR No username given.\r\n")],
                          [LoginFailed(None, "USER")]),
    "USER refused": ([GREETING, (C, b"USER bob\r\n"),
                      (S, b"-ERR [AUTH] Plaintext authentication disallowed on non-secure "
                          b"(SSL/TLS) connections.\r\n"),
                      (C, f"PASS {PASSWORD}\r\n".encode()), AUTH_FAILED],
                     [LoginFailed(None, "USER")]),
}


@pytest.mark.parametrize("steps, expected", FAILED.values(), ids=FAILED.keys())
def test_failed_login(steps, expected):
    assert_every_cut(steps, expected)
    # nothing is settled: a later attempt is still learnt, and partial bytes wait
    retry = [(C, b"USER bob\r\n"), (S, b"+OK\r\n"), (C, b"PASS x\r\n"), LOGGED_IN]
    machine = POP3Machine()
    assert feed(machine, steps + [(C, b"NO"), (S, b"-E")]) == expected
    machine = POP3Machine()
    assert feed(machine, steps + retry) == expected + [LoginSucceeded("bob", "USER")]


def test_server_giving_up_on_a_sasl_exchange_ends_it():
    steps = [GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"),
             (S, b"-ERR Authentication timed out.\r\n"), *POPLIB_LOGIN[1:]]
    assert_every_cut(steps, [LoginFailed(None, "AUTH PLAIN"), LoginSucceeded("bob", "USER")],
                     settled=True)


REFUSED_LOGINS = {
    "+OK to PASS without USER": [GREETING, (C, b"PASS x\r\n"), (S, b"+OK\r\n")],
    "+OK to PASS after USER was refused": [
        GREETING, (C, b"USER bob\r\n"), (S, b"-ERR no\r\n"), (C, b"PASS x\r\n"), (S, b"+OK\r\n")],
    "a PASS uses up its USER": [
        GREETING, (C, b"USER bob\r\n"), (S, b"+OK\r\n"), (C, b"PASS x\r\n"), AUTH_FAILED,
        (C, b"PASS y\r\n"), (S, b"+OK\r\n")],
    "+OK to AUTH before any SASL response": [GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+OK\r\n")],
    "+OK after the client cancelled AUTH": [
        GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"), (C, b"*\r\n"), (S, b"+OK\r\n")],
    "SASL challenge to USER": [GREETING, (C, b"USER bob\r\n"), (S, b"+ \r\n")],
    "+OK while the server awaits a SASL response": [
        GREETING, (C, b"AUTH PLAIN\r\n"), (S, b"+ \r\n"), (S, b"+OK\r\n")],
}


@pytest.mark.parametrize("steps", REFUSED_LOGINS.values(), ids=REFUSED_LOGINS.keys())
def test_ok_that_cannot_be_a_login_is_refused(steps):
    assert_refused_every_cut(steps)


# --- multi-line responses -----------------------------------------------------------

# A body full of lines a careless parser would take for replies.
BODY = b"+OK Logged in.\r\n..\r\n..+OK\r\n-ERR no\r\n+ challenge\r\nSTLS\r\n"
MULTI_LINE = {
    "CAPA": b"CAPA",
    "LIST": b"LIST",
    "UIDL": b"UIDL",
    "RETR": b"RETR 1",
    "TOP": b"TOP 1 10",
    "AUTH listing mechanisms": b"AUTH",
    "LANG": b"LANG",
}


@pytest.mark.parametrize("command", MULTI_LINE.values(), ids=MULTI_LINE.keys())
def test_ok_inside_a_body_is_no_reply(command):
    replies = b"+OK\r\n+OK body follows\r\n" + BODY + b".\r\n-ERR [AUTH] failed.\r\n"
    steps = [GREETING, *CAPA, (C, b"USER bob\r\n" + command + b"\r\nPASS x\r\n"), (S, replies)]
    expected = [TLSOffered(STLS_AT, 4), LoginFailed("bob", "USER")]
    if command == b"CAPA":  # its body is read for STLS
        at = len(GREETING[1] + CAPA_BODY) + replies.index(b"STLS")
        expected.insert(1, TLSOffered(at, 4))
    assert_every_cut(steps, expected)


@pytest.mark.parametrize("command", [b"LIST 1", b"UIDL 1", b"STAT", b"NOOP", b"LANG fr"])
def test_single_line_replies(command):
    steps = [GREETING, *CAPA, (C, b"USER bob\r\n" + command + b"\r\nPASS x\r\n"),
             (S, b"+OK\r\n+OK 1 120\r\n+OK Logged in.\r\n")]
    assert_every_cut(steps, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "USER")], settled=True)


def test_refused_multi_line_command_has_no_body():
    steps = [GREETING, *CAPA, (C, b"RETR 1\r\nUSER bob\r\nPASS x\r\n"),
             (S, b"-ERR Unknown command.\r\n+OK\r\n+OK Logged in.\r\n")]
    assert_every_cut(steps, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "USER")], settled=True)


# --- pipelining -----------------------------------------------------------------------

def test_pipelining_needs_the_capability():
    assert_refused_every_cut([GREETING, (C, b"USER bob\r\nPASS x\r\n")])
    assert_refused_every_cut([GREETING, *NO_PIPELINING, (C, b"USER bob\r\nPASS x\r\n")])


def test_commands_before_the_greeting_wait_for_it():
    steps = [(C, b"USER bob\r\n"), GREETING, (S, b"+OK\r\n"), (C, b"PASS x\r\n"), LOGGED_IN]
    assert_every_cut(steps, [LoginSucceeded("bob", "USER")], settled=True)


def test_max_pending():
    steps = [GREETING, *CAPA, (C, b"NOOP\r\n" * 3)]
    assert_every_cut(steps, [TLSOffered(STLS_AT, 4)], max_pending=3)
    assert_refused_every_cut([GREETING, *CAPA, (C, b"NOOP\r\n" * 4)], max_pending=3)


def test_lines_held_behind_auth_are_read_as_the_reply_decides():
    # After a challenge the held line is the SASL response, not a command.
    challenged = [GREETING, *CAPA, (C, b"AUTH PLAIN\r\n" + PLAIN_IR.encode() + b"\r\n"),
                  (S, b"+ \r\n"), LOGGED_IN]
    assert_every_cut(challenged, [TLSOffered(STLS_AT, 4), LoginSucceeded("bob", "AUTH PLAIN")],
                     settled=True)
    hidden_pass = [GREETING, *CAPA, (C, b"AUTH PLAIN\r\nPASS x\r\n"), (S, b"+ \r\n"), AUTH_FAILED]
    assert_every_cut(hidden_pass, [TLSOffered(STLS_AT, 4), LoginFailed(None, "AUTH PLAIN")])
    # After -ERR the held lines are commands again.
    refused = [GREETING, *CAPA, (C, f"AUTH PLAIN {PLAIN_IR}\r\nQUIT\r\n".encode()),
               (S, b"-ERR [AUTH] Authentication failed.\r\n+OK Logging out\r\n")]
    assert_every_cut(refused, [TLSOffered(STLS_AT, 4), LoginFailed("bob", "AUTH PLAIN"), Quit()],
                     settled=True)


def test_data_behind_auth_needs_pipelining():
    assert_refused_every_cut([GREETING, (C, f"AUTH PLAIN {PLAIN_IR}\r\nSTAT\r\n".encode())])


def test_data_held_behind_auth_is_bounded():
    assert_refused_every_cut(
        [GREETING, *CAPA, (C, b"AUTH PLAIN\r\n"), (C, b"NOOP\r\n" * 20)], max_line=64)


# --- STLS -----------------------------------------------------------------------------

def test_stls_started():
    steps = [GREETING, *CAPA, (C, b"STLS\r\n"), (S, b"+OK Begin TLS negotiation now.\r\n")]
    assert_every_cut(steps, [TLSOffered(STLS_AT, 4), StartTLSRequested(), TLSStarted()],
                     settled=True)
    machine = POP3Machine()
    feed(machine, steps)
    assert feed(machine, [(C, b"\x16\x03\x01\x02\x00\x01"), (S, b"\x16\x03\x03")]) == []


def test_stls_refused_goes_on():
    refused = (S, b"-ERR TLS support isn't enabled.\r\n")
    steps = [GREETING, (C, b"STLS\r\n"), refused, *POPLIB_LOGIN[1:]]
    assert_every_cut(steps, [StartTLSRequested(), LoginSucceeded("bob", "USER")], settled=True)


@pytest.mark.parametrize("after", [b"USER bob\r\n", b"U", b"\r\n"])
def test_injection_after_stls(after):
    assert_refused_every_cut([GREETING, *CAPA, (C, b"STLS\r\n" + after)])


# --- QUIT -----------------------------------------------------------------------------

def test_quit():
    steps = [GREETING, (C, b"QUIT\r\n"), (S, b"+OK Logging out\r\n")]
    assert_every_cut(steps, [Quit()], settled=True)


def test_quit_settles_only_after_earlier_replies():
    steps = [GREETING, *CAPA, (C, b"USER bob\r\nPASS x\r\nQUIT\r\n")]
    machine = POP3Machine()
    assert feed(machine, steps) == [TLSOffered(STLS_AT, 4), Quit()]
    assert not machine.settled
    assert feed(machine, [(S, b"+OK\r\n+OK Logged in.\r\n")]) == [LoginSucceeded("bob", "USER")]


# --- lines the server could read differently ------------------------------------------

REFUSED_LINES = {
    "CR inside a line": b"USER bob\rPASS x\r\n",
    "NUL": b"USER b\x00ob\r\n",
    "tab": b"USER\tbob\r\n",
    "empty line": b"\r\n",
    "leading space": b" USER bob\r\n",
    "bare LF after a command without arguments": b"CAPA\nUSER bob\r\n",
    "over max_line": b"X" * 2050,  # 2048 plus room for a CR before the LF
    "command over RFC 2449's limit": b"PASS " + b"x" * (MAX_COMMAND - 6) + b"\r\n",
}


@pytest.mark.parametrize("line", REFUSED_LINES.values(), ids=REFUSED_LINES.keys())
def test_refused_client_lines(line):
    assert_refused_every_cut([GREETING, (C, line)])


def test_auth_lines_may_be_long():
    token = base64.b64encode(b"\0bob\0" + b"p" * 600)
    steps = [GREETING, (C, b"AUTH PLAIN " + token + b"\r\n"), LOGGED_IN]
    assert_every_cut(steps, [LoginSucceeded("bob", "AUTH PLAIN")], settled=True)
    longest = b"PASS " + b"x" * (MAX_COMMAND - 7) + b"\r\n"
    assert_every_cut([GREETING, (C, b"USER bob\r\n"), (S, b"+OK\r\n"), (C, longest), LOGGED_IN],
                     [LoginSucceeded("bob", "USER")], settled=True)


REFUSED_SERVER = {
    "no status": [(S, b"Dovecot ready.\r\n")],
    "lower-case status": [(S, b"+ok ready\r\n")],
    "+OK with no command": [GREETING, (S, b"+OK\r\n")],
    "over max_line": [(S, b"+OK " + b"x" * 2100)],
}


@pytest.mark.parametrize("steps", REFUSED_SERVER.values(), ids=REFUSED_SERVER.keys())
def test_refused_server_lines(steps):
    assert_refused_every_cut(steps)


def test_parting_err_is_ignored():
    steps = [GREETING, (S, b"-ERR Disconnected for inactivity.\r\n")]
    assert_every_cut(steps, [])


# --- credentials -----------------------------------------------------------------------

ALL = [*LOGINS.values(), *FAILED.values()]


@pytest.mark.parametrize("steps, expected", ALL)
def test_password_never_shown(steps, expected):
    POP3.assert_password_never_shown(steps)


@pytest.mark.parametrize("line", [
    f"USER bob\r\nPASS {PASSWORD}\r\n".encode(),                  # pipelined without PIPELINING
    f"PASS {PASSWORD}\tx\r\n".encode(),                          # control character
    f"PASS {PASSWORD}{'x' * MAX_COMMAND}\r\n".encode(),          # too long
    f"STLS\r\nPASS {PASSWORD}\r\n".encode(),                     # injection
])
def test_password_never_in_errors(line):
    machine = POP3Machine()
    machine.receive_server(GREETING[1])
    with pytest.raises(ProtocolError) as raised:
        machine.receive_client(line)
    for text in (raised.value.hint, str(raised.value), repr(raised.value), repr(machine)):
        assert PASSWORD not in text


# --- hypothesis: any bytes --------------------------------------------------------------

TOKENS = [b"USER bob\r\n", b"PASS x\r\n", b"APOP a b\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
          f"AUTH PLAIN {PLAIN_IR}\r\n".encode(), b"AUTH\r\n", b"CAPA\r\n", b"LIST\r\n",
          b"RETR 1\r\n", b"STLS\r\n", b"QUIT\r\n", b"*\r\n", b"Ym9i\r\n", b"+OK\r\n", b"-ERR\r\n",
          b"+ \r\n", b".\r\n", b"..\r\n", b"PIPELINING\r\n", b"\r\n", b"\n", b"\r", b" ", b"\x00"]
chunk = st.one_of(st.sampled_from(TOKENS), st.binary(max_size=12))


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from([C, S]), chunk), max_size=40),
       max_line=st.sampled_from([8, 64, 2048]), max_pending=st.sampled_from([1, 3, 100]))
def test_any_bytes_parse_or_raise_protocol_error(steps, max_line, max_pending):
    POP3.assert_parses_or_raises(steps, max_line=max_line, max_pending=max_pending)


# --- hypothesis: a login only from the +OK that answers PASS, APOP or AUTH --------------

@dataclass
class Session:
    """A scripted session: client lines, and server lines each answering one client line."""

    client: list[bytes] = field(default_factory=list)
    server: list[tuple[bytes, int]] = field(default_factory=list)  # (line, index into client)
    login_replies: set[int] = field(default_factory=set)  # server lines that may log in
    pipelining_after: int = 0  # server lines fed before the client may run ahead
    logins: list = field(default_factory=list)  # LoginSucceeded/LoginFailed a server would mean

    def say(self, line: bytes) -> int:
        self.client.append(line)
        return len(self.client) - 1

    def answer(self, to: int, *lines: bytes, login: bool = False) -> None:
        if login:
            self.login_replies.add(len(self.server))
        self.server += [(line, to) for line in lines]


@st.composite
def sessions(draw, clean: bool):
    """Random exchanges; unless `clean`, replies may also not fit their commands."""
    s = Session()
    s.answer(-1, b"+OK ready\r\n")
    s.answer(s.say(b"CAPA\r\n"), b"+OK\r\n", b"PIPELINING\r\n", b"+OK Logged in.\r\n", b".\r\n")
    s.pipelining_after = len(s.server)
    user = None
    kinds = ["USER", "PASS", "APOP", "AUTH PLAIN", "AUTH LOGIN", "LIST", "RETR", "NOOP"]
    for n in range(draw(st.integers(1, 10))):
        kind, ok = draw(st.sampled_from(kinds)), draw(st.booleans())
        status = b"+OK r%d\r\n" % n if ok else b"-ERR r%d\r\n" % n
        if not clean and draw(st.integers(0, 5)) == 0:
            # no challenge to AUTH: it makes the next client line a SASL response, in
            # the server as in the machine, and the script could no longer tell logins;
            # no bare +OK to LIST or RETR either: it opens a body, which the script's
            # next lines would not be
            misfits = ([b".\r\n", b"junk\r\n"] + ([] if "AUTH" in kind else [b"+ \r\n"])
                       + ([] if kind in ("LIST", "RETR") else [b"+OK\r\n"]))
            status = draw(st.sampled_from(misfits))
        if kind == "USER":
            s.answer(s.say(b"USER u%d\r\n" % n), status)
            user = f"u{n}" if ok else None
        elif kind == "PASS":
            if clean and user is None:  # a server refuses PASS without an accepted USER
                ok, status = False, b"-ERR r%d\r\n" % n
            s.answer(s.say(b"PASS x\r\n"), status, login=True)
            s.logins.append((LoginSucceeded if ok else LoginFailed)(user, "USER"))
            user = None
        elif kind == "APOP":
            s.answer(s.say(b"APOP u%d 0123\r\n" % n), status, login=True)
            s.logins.append((LoginSucceeded if ok else LoginFailed)(f"u{n}", "APOP"))
        elif kind == "AUTH PLAIN":
            ir = base64.b64encode(b"\0u%d\0x" % n)
            s.answer(s.say(b"AUTH PLAIN " + ir + b"\r\n"), status, login=True)
            s.logins.append((LoginSucceeded if ok else LoginFailed)(f"u{n}", "AUTH PLAIN"))
        elif kind == "AUTH LOGIN":
            s.answer(s.say(b"AUTH LOGIN\r\n"), b"+ VXNlcm5hbWU6\r\n")
            s.answer(s.say(base64.b64encode(b"u%d" % n) + b"\r\n"), b"+ UGFzc3dvcmQ6\r\n")
            s.answer(s.say(b"eA==\r\n"), status, login=True)
            s.logins.append((LoginSucceeded if ok else LoginFailed)(f"u{n}", "AUTH LOGIN"))
        else:
            command = {"LIST": b"LIST\r\n", "RETR": b"RETR 1\r\n", "NOOP": b"NOOP\r\n"}[kind]
            body = [b"+OK Logged in.\r\n", b"..\r\n", b".\r\n"] if ok and kind != "NOOP" else []
            s.answer(s.say(command), status, *body)
        if s.logins and isinstance(s.logins[-1], LoginSucceeded):
            break
    return s


def run(data, session: Session):
    """Feed the session in an order Hypothesis picks: a server line only after
    the client line it answers, and the client ahead of the server only once
    PIPELINING is known.

    Returns [(event, index of the server line fed or None)] and whether a
    ProtocolError ended the run."""
    machine, seen = POP3Machine(), []
    c = s = 0
    try:
        while s < len(session.server):
            line, answers = session.server[s]
            may_run_ahead = s >= session.pipelining_after and data.draw(st.booleans())
            client_first = c < len(session.client) and (answers >= c or may_run_ahead)
            if client_first:
                for piece in _cut(data, session.client[c]):
                    seen += [(e, None) for e in machine.receive_client(piece)]
                c += 1
            else:
                for piece in _cut(data, line):
                    seen += [(e, s) for e in machine.receive_server(piece)]
                s += 1
    except ProtocolError:
        return seen, True
    return seen, False


def _cut(data, line: bytes) -> list[bytes]:
    at = data.draw(st.integers(0, len(line) - 1))
    return [line[:at], line[at:]] if at else [line]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), session=sessions(clean=False))
def test_login_only_from_the_reply_to_a_login_command(data, session):
    seen, _ = run(data, session)
    logins = [(e, line) for e, line in seen if isinstance(e, LoginSucceeded)]
    assert len(logins) <= 1
    for _, line in logins:
        assert line in session.login_replies
        assert session.server[line][0].startswith((b"+OK ", b"+OK\r"))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), session=sessions(clean=True))
def test_clean_sessions_learn_what_the_server_meant(data, session):
    seen, failed = run(data, session)
    assert not failed
    assert [e for e, _ in seen if isinstance(e, (LoginSucceeded, LoginFailed))] == session.logins
