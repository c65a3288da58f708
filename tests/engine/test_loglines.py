"""Log lines in, logins out: Dovecot 2.3 and 2.4, Courier, and names chosen to deceive.

The Dovecot 2.3 lines are as the lab's Dovecot 2.3.19 wrote them (log_path,
and the same through syslog); the 2.4 lines follow 2.4's default
login_log_format ("%{message}: %{elements}") and elements, which are the
2.3 ones under new variable names. A user name is the client's text: the
invariant is that no name, whatever it holds, makes a line name another
address or turns a failure into a login.
"""

from __future__ import annotations

import pytest
from dovecot_lines import SESSION, failed, login
from hypothesis import given, settings
from hypothesis import strategies as st

from sapd_nfq.engine.loglines import MAX_LINE, LogLogin, LogSessionEnd, parse_line

GOOD = {
    "2.3 log_path imap": (login("alice"),
                          LogLogin("dovecot", "imap", "198.18.1.2", "alice", "PLAIN", True, SESSION)),
    "2.3 log_path pop3 CRAM-MD5": (
        login("bob", service="pop3", method="CRAM-MD5"),
        LogLogin("dovecot", "pop3", "198.18.1.2", "bob", "CRAM-MD5", True, SESSION)),
    "2.3 submission": (login("alice", service="submission"),
                       LogLogin("dovecot", "submission", "198.18.1.2", "alice", "PLAIN", True, SESSION)),
    "syslog": (login("alice", prefix="Dec  2 04:44:31 mail dovecot: ", info=""),
               LogLogin("dovecot", "imap", "198.18.1.2", "alice", "PLAIN", True, SESSION)),
    "syslog with pid, RFC 3339": (
        login("alice", service="pop3", prefix="2026-12-02T04:44:31.123456+00:00 mail dovecot[812]: ",
                info=""),
        LogLogin("dovecot", "pop3", "198.18.1.2", "alice", "PLAIN", True, SESSION)),
    "2.4 plaintext, no mpid shown": (
        login("alice@lab.example", info="",
                tail=f"rip=2001:db8:1::2, lip=2001:db8:2::2, session=<{SESSION}>"),
        LogLogin("dovecot", "imap", "2001:db8:1::2", "alice@lab.example", "PLAIN", False, SESSION)),
    "2.4 secured": (
        login("alice", tail=f"rip=198.18.1.2, lip=198.18.2.2, mpid=7, secured, "
                                      f"session=<{SESSION}>"),
        LogLogin("dovecot", "imap", "198.18.1.2", "alice", "PLAIN", True, SESSION)),
    "IPv4-mapped address": (
        login("alice", tail="rip=::ffff:198.18.1.2, lip=::ffff:198.18.2.2"),
        LogLogin("dovecot", "imap", "198.18.1.2", "alice", "PLAIN", False, None)),
    "courier imapd-ssl": (
        b"Dec  2 04:44:31 mail imapd-ssl: LOGIN, user=alice, ip=[::ffff:198.18.1.2], "
        b"port=[40312], protocol=IMAP",
        LogLogin("courier", "imap", "198.18.1.2", "alice", None, True)),
    "courier pop3d": (
        b"Dec  2 04:44:31 mail pop3d: LOGIN, user=bob, ip=[2001:db8:1::2], port=[40312]",
        LogLogin("courier", "pop3", "2001:db8:1::2", "bob", None, False)),
    # a name holding a whole success line's fields stays a name: the server's follow it
    "forged fields inside the name": (
        login("x>, method=PLAIN, rip=198.18.6.6, lip=198.18.2.2, mpid=1, TLS, session=<a"),
        LogLogin("dovecot", "imap", "198.18.1.2",
                 "x>, method=PLAIN, rip=198.18.6.6, lip=198.18.2.2, mpid=1, TLS, session=<a",
                 "PLAIN", True, SESSION)),
    "courier forged fields inside the name": (
        b"Dec  2 04:44:31 mail imapd: LOGIN, user=x, ip=[198.18.6.6], port=[1], "
        b"ip=[198.18.1.2], port=[40312], protocol=IMAP",
        LogLogin("courier", "imap", "198.18.1.2", "x, ip=[198.18.6.6], port=[1]", None, False)),
}


@pytest.mark.parametrize("line, expected", GOOD.values(), ids=GOOD.keys())
def test_success_lines(line, expected):
    assert parse_line(line) == expected


NOT_LOGINS = {
    "failed login": failed("alice"),
    "failed login whose name is a success line": failed(
        "alice>, method=PLAIN, rip=198.18.6.6, lip=198.18.2.2, mpid=1, TLS, session=<abc> "
        "imap-login: Info: Login: user=<alice"),
    "failed, name starting like a message": failed("Login: user=<alice>, method=PLAIN, "
                                                  "rip=198.18.6.6, lip=198.18.2.2"),
    "auth process line": (b"Dec 02 04:44:31 auth: Info: passwd-file(imap-login: Info: Login: "
                          b"user=<x>, method=PLAIN, rip=198.18.6.6, lip=198.18.2.2,198.18.1.2,"
                          b"<ApWETJ9h4L/GEgEC>): unknown user"),
    "the mail process": (b"Dec 02 04:44:31 imap(alice)<28598><xJF7TJ9h2L/GEgEC>: Info: "
                         b"Login: user=<alice>, method=PLAIN, rip=198.18.6.6, lip=198.18.2.2"),
    "another program": (b"Dec  2 04:44:31 mail evil: imap-login: Login: user=<x>, "
                        b"method=PLAIN, rip=198.18.6.6, lip=198.18.2.2"),
    "TLS handshaking (the session is not secured yet)": login(
        "alice", tail="rip=198.18.1.2, lip=198.18.2.2, TLS handshaking"),
    "custom elements": login("alice", tail="rip=198.18.1.2, lip=198.18.2.2, port=143"),
    "not an address": login("alice", tail="rip=example.org, lip=198.18.2.2"),
    "courier failure": (b"Dec  2 04:44:31 mail imapd: LOGIN FAILED, user=alice, "
                        b"ip=[::ffff:198.18.1.2]"),
    "courier failure, name a success": (
        b"Dec  2 04:44:31 mail imapd: LOGIN FAILED, user=x imapd: LOGIN, user=alice, "
        b"ip=[198.18.6.6], port=[1], ip=[::ffff:198.18.1.2]"),
    "too long": login("a" * MAX_LINE),
    "a line break inside": login("alice") + b"\n" + login("bob"),
    "empty": b"",
}


@pytest.mark.parametrize("line", NOT_LOGINS.values(), ids=NOT_LOGINS.keys())
def test_not_logins(line):
    assert not isinstance(parse_line(line), LogLogin)


@pytest.mark.parametrize("line", [
    b"Dec 02 04:44:31 imap(alice)<28598><xJF7TJ9h2L/GEgEC>: Info: Disconnected: Logged out "
    b"in=32 out=564 deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0",
    b"Dec 02 04:44:31 imap(alice)<28598><xJF7TJ9h2L/GEgEC>: Logged out in=32 out=564",
    b"Dec  2 04:44:31 mail dovecot: imap(a) b)<28598><xJF7TJ9h2L/GEgEC>: Disconnected: "
    b"Connection closed (IDLE running for 0.001 + waiting input for 3600 secs)",
])
def test_session_ends(line):
    assert parse_line(line) == LogSessionEnd("imap", SESSION)


NAME_CHARS = st.lists(st.sampled_from([*"ab@.<>,= :[]()x", "198.18.6.6", "rip=", "lip=", ", ",
                                        "Login", "session=<", ">, method=PLAIN, "]),
                      max_size=20).map("".join)


@settings(max_examples=300, deadline=None)
@given(name=NAME_CHARS)
def test_no_name_changes_the_address_or_makes_a_failure_a_login(name):
    assert not isinstance(parse_line(failed(name)), LogLogin)
    got = parse_line(login(name))
    assert isinstance(got, LogLogin)
    assert (got.address, got.session) == ("198.18.1.2", SESSION)
    assert got.user == (name or None)
