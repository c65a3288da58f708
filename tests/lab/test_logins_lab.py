"""Logins the wire cannot show, and IMAP, on live traffic with the lab's Dovecot.

For each source (`imap` inline, `log:dovecot` from Dovecot's own log file):
a login lets the relay pass; a wrong password does not; with the source
switched off nothing is learned. The log source is tried with the clients
users have over TLS: curl (pop3s://, imaps://, and --ssl-reqd on 110/143 for
STLS/STARTTLS), Python's imaplib and poplib; both modes and both families.
Names chosen to look like success lines go through the real Dovecot and must
learn nothing. Dovecot delays every failed login (~2 s, longer on repeats
from one address), so failures use fresh addresses and generous timeouts.
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import re
import socket
import ssl
import time
import uuid
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import CLIENT_TIMEOUT, relay_denied, try_rcpt, wait_until

from sapd_nfq.lab.client_mta import ClientMTA

pytestmark = pytest.mark.lab

FAMILIES = [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")]
LOCAL = "alice@lab.example"
LEARN_TIMEOUT = 10.0  # seconds from a client's login to the gate's log line, on a busy machine
LOGIN_TIMEOUT = 30  # seconds a client waits for a login: Dovecot's failure delay is up to 15 s


def external() -> str:
    return f"relay-{uuid.uuid4().hex[:10]}@external.example"


def url_host(server: str) -> str:
    return f"[{server}]" if ":" in server else server


# --- clients from a chosen source address ---------------------------------------------

def _connect(host: str, port: int, source: str, timeout: float | None) -> socket.socket:
    return socket.create_connection((host, port), timeout, source_address=(source, 0))


class SourceIMAP4(imaplib.IMAP4):
    def __init__(self, host: str, source: str, port: int = 143) -> None:
        self.source = source
        super().__init__(host, port, timeout=CLIENT_TIMEOUT)

    def _create_socket(self, timeout):
        return _connect(self.host, self.port, self.source, timeout)


class SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, host: str, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__(host, 993, ssl_context=context, timeout=CLIENT_TIMEOUT)

    def _create_socket(self, timeout):
        sock = _connect(self.host, self.port, self.source, timeout)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


class SourcePOP3_SSL(poplib.POP3_SSL):
    def __init__(self, host: str, source: str, context: ssl.SSLContext) -> None:
        self.source = source
        super().__init__(host, 995, timeout=CLIENT_TIMEOUT, context=context)

    def _create_socket(self, timeout):
        sock = _connect(self.host, self.port, self.source, timeout)
        return self.context.wrap_socket(sock, server_hostname=self.host)


def tls(mail_server) -> ssl.SSLContext:
    # the lab's certificate names the server's addresses: verified, not waved through
    return ssl.create_default_context(cafile=str(mail_server.cert))


def curl(lab, mail_server, source: str, url: str, *, user: str = "alice",
         password: str | None = None, ssl_reqd: bool = False, sasl: str | None = None):
    password = mail_server.users[user] if password is None else password
    # Dovecot delays logins from where logins failed (for IPv6, a whole prefix), up to 15 s
    argv = ["curl", "-sS", "--max-time", str(LOGIN_TIMEOUT), "--interface", source,
            "--cacert", str(mail_server.cert), "--user", f"{user}:{password}", url]
    if ssl_reqd:
        argv.insert(1, "--ssl-reqd")
    if sasl is not None:
        argv[1:1] = ["--login-options", f"AUTH={sasl}"]
    return lab.run("client", argv, capture_output=True, text=True, check=False)


def login_over_tls(how: str, lab, mail_server, source: str, server: str,
                   password: str | None = None) -> bool:
    """Log in as alice over TLS in one of the ways users do; True if the server said yes."""
    host = url_host(server)
    password = mail_server.users["alice"] if password is None else password
    if how.startswith("curl"):
        url = {"curl-imaps": f"imaps://{host}/INBOX", "curl-pop3s": f"pop3s://{host}/",
               "curl-imap-starttls": f"imap://{host}/INBOX",
               "curl-pop3-stls": f"pop3://{host}/"}[how]
        done = curl(lab, mail_server, source, url, password=password,
                    ssl_reqd="tls" in how or "stls" in how)
        return done.returncode == 0
    try:
        if how == "imaplib-ssl":
            with lab.inside("client"):
                imap = SourceIMAP4_SSL(server, source, tls(mail_server))
            try:
                imap.login("alice", password)
            finally:
                imap.shutdown()
        elif how == "imaplib-starttls":
            with lab.inside("client"):
                imap = SourceIMAP4(server, source)
            imap.starttls(tls(mail_server))
            try:
                imap.login("alice", password)
            finally:
                imap.shutdown()
        elif how == "poplib-ssl":
            with lab.inside("client"):
                pop = SourcePOP3_SSL(server, source, tls(mail_server))
            try:
                pop.user("alice")
                pop.pass_(password)
            finally:
                pop.quit()
        else:
            raise ValueError(how)
    except (imaplib.IMAP4.error, poplib.error_proto):
        return False
    return True


def logged_in(gate, address: str) -> list[str]:
    """The `auth list` lines of `address`."""
    out = gate.cli("auth", "list").stdout
    return [line for line in out.splitlines() if line.split()[:1] == [address]]


def assert_refused(lab, source: str, server: str) -> None:
    refused = try_rcpt(lab, source, server, LOCAL, external())
    assert refused is not None and refused.code == 550, refused


# --- the log source ----------------------------------------------------------------------

TLS_CLIENTS = ["curl-imaps", "curl-pop3s", "curl-imap-starttls", "curl-pop3-stls",
               "imaplib-ssl", "imaplib-starttls", "poplib-ssl"]


@pytest.fixture
def log_gate(make_gate, mail_server, request):
    mode = getattr(request, "param", "forward")
    return make_gate(mode, login_logs=[str(mail_server.dovecot_log)])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", TLS_CLIENTS)
def test_a_tls_login_learned_from_the_log_lets_the_relay_pass(lab, mail_server, log_gate,
                                                              fresh, family, how):
    source, server = fresh(family), lab.server.address(family)
    assert_refused(lab, source, server)
    started = time.monotonic()
    assert login_over_tls(how, lab, mail_server, source, server)
    gate = log_gate
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='log:dovecot",
                      timeout=LEARN_TIMEOUT)
    learned = time.monotonic() - started
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    [entry] = logged_in(gate, source)
    assert entry.split()[-1] == "log:dovecot"
    print(f"\n{how}: login to learned in {learned:.2f} s (client's whole session included)")


def test_an_imaps_login_from_the_log_lets_the_sending_postfix_relay(lab, mail_server, log_gate):
    """The lab's sending Postfix as the client (relayhost: the server): its relay bounces
    until alice fetches her mail over IMAPS from the same address; once the gate has
    read that login in Dovecot's log, the same relay is sent."""
    source, server = lab.client.ipv4, lab.server.ipv4
    with ClientMTA(lab) as mta:
        before = external()
        status = mta.wait_for_status(before, mta.send(LOCAL, before, "before the login"))
        assert "status=bounced" in status and relay_denied(status), status

        assert login_over_tls("curl-imaps", lab, mail_server, source, server)
        log_gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='log:dovecot",
                              timeout=LEARN_TIMEOUT)
        after = external()
        status = mta.wait_for_status(after, mta.send(LOCAL, after, "after an IMAPS login"))
        assert "status=sent (250 2.0.0 Ok: queued as " in status, status


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("log_gate", ["input"], indirect=True)
def test_input_mode_learns_from_the_log_too(lab, mail_server, log_gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    assert login_over_tls("curl-imaps", lab, mail_server, source, server)
    log_gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='log:dovecot",
                          timeout=LEARN_TIMEOUT)
    assert try_rcpt(lab, source, server, LOCAL, external()) is None


def learned_up_to_now(lab, mail_server, gate, fresh, family) -> None:
    """A good login from a control address, learned: every line before it was read."""
    control = fresh(family)
    assert login_over_tls("curl-imaps", lab, mail_server, control, lab.server.address(family))
    gate.wait_for_log(rf"LOGIN client={re.escape(control)} ", timeout=LEARN_TIMEOUT)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_wrong_password_over_tls_learns_nothing(lab, mail_server, log_gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    for how in ("curl-imaps", "poplib-ssl"):
        assert not login_over_tls(how, lab, mail_server, source, server, password="wrong")
    learned_up_to_now(lab, mail_server, log_gate, fresh, family)
    assert logged_in(log_gate, source) == []
    assert_refused(lab, source, server)


def test_with_the_log_source_off_nothing_is_learned(lab, mail_server, make_gate, fresh):
    gate = make_gate("forward")
    source, server = fresh(), lab.server.ipv4
    assert login_over_tls("curl-imaps", lab, mail_server, source, server)
    time.sleep(1.0)  # several polls of a learner, were there one
    assert logged_in(gate, source) == []
    assert_refused(lab, source, server)


def deceiving_names(rip: str, lip: str) -> list[bytes]:
    fields = f"method=PLAIN, rip={rip}, lip={lip}, mpid=1, TLS, session=<c2Vzc2lvbg>"
    return [
        f"x>, {fields}".encode(),
        f"{rip}".encode(),
        f"alice>, method=PLAIN, rip={rip}".encode(),
        f"x\r\nDec 02 04:44:31 imap-login: Info: Login: user=<alice>, {fields}".encode(),
        f"x\nimap-login: Login: user=<alice>, {fields}".encode(),
    ]


def failed_raw_login(lab, mail_server, source: str, server: str, name: bytes) -> bytes:
    """LOGIN over IMAPS with `name` as a literal (CR and LF included) and a wrong password."""
    with lab.inside("client"):
        sock = _connect(server, 993, source, CLIENT_TIMEOUT * 3)
    with tls(mail_server).wrap_socket(sock, server_hostname=server) as conn:
        reader = conn.makefile("rb")
        reader.readline()  # greeting
        conn.sendall(b"a LOGIN {%d+}\r\n%s wrong\r\n" % (len(name), name))
        reply = reader.readline()
        while reply and not reply.startswith(b"a "):
            reply = reader.readline()
        conn.sendall(b"b LOGOUT\r\n")
        return reply


@pytest.mark.parametrize("family", FAMILIES)
def test_failed_logins_whose_names_look_like_success_learn_nothing(lab, mail_server, log_gate,
                                                                   fresh, family):
    server = lab.server.address(family)
    victims = []
    for name_of in range(len(deceiving_names("x", "x"))):
        source, victim = fresh(family), fresh(family)  # fresh: no growing failure delay
        victims += [source, victim]
        name = deceiving_names(victim, server)[name_of]
        reply = failed_raw_login(lab, mail_server, source, server, name)
        assert reply.startswith((b"a NO", b"a BAD")), reply
    learned_up_to_now(lab, mail_server, log_gate, fresh, family)
    dovecot_log = mail_server.dovecot_log.read_text(errors="replace")
    assert "auth failed" in dovecot_log
    for address in victims:
        assert logged_in(log_gate, address) == [], address
    for address in victims[:2]:
        assert_refused(lab, address, server)


def test_an_idle_session_keeps_its_window_until_it_ends(lab, mail_server, make_gate, fresh):
    ttl = 6
    gate = make_gate("forward", auth_ttl=ttl, login_logs=[str(mail_server.dovecot_log)])
    source, server = fresh(), lab.server.ipv4
    with lab.inside("client"):
        imap = SourceIMAP4_SSL(server, source, tls(mail_server))
    imap.login("alice", mail_server.users["alice"])
    imap.select("INBOX")
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} ", timeout=LEARN_TIMEOUT)
    tag = imap._new_tag()
    imap.send(tag + b" IDLE\r\n")
    assert imap.readline().startswith(b"+")
    time.sleep(ttl * 2.5)  # well past the window: only renewal keeps it open
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    imap.send(b"DONE\r\n")
    imap.readline()
    imap.logout()
    # the session's end stops the renewal; the window then runs out
    wait_until(lambda: not logged_in(gate, source), ttl * 3, "the window to close after logout",
               interval=0.5)
    assert_refused(lab, source, server)


# --- inline IMAP ---------------------------------------------------------------------------

def imap_plain_login(lab, mail_server, source: str, server: str, password: str | None = None):
    with lab.inside("client"):
        imap = SourceIMAP4(server, source)
    try:
        imap.login("alice", mail_server.users["alice"] if password is None else password)
        return True
    except imaplib.IMAP4.error:
        return False
    finally:
        imap.shutdown()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["forward", "input"])
def test_an_inline_imap_login_lets_the_relay_pass(lab, mail_server, make_gate, fresh, family,
                                                  mode):
    gate = make_gate(mode)
    server = lab.server.address(family)
    source = fresh(family)
    assert_refused(lab, source, server)
    assert imap_plain_login(lab, mail_server, source, server)
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='imap LOGIN'")
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    # curl logs in with AUTHENTICATE PLAIN (SASL-IR)
    other = fresh(family)
    done = curl(lab, mail_server, other, f"imap://{url_host(server)}/INBOX", sasl="PLAIN")
    assert done.returncode == 0, done.stderr
    gate.wait_for_log(rf"LOGIN client={re.escape(other)} .*user=alice reason='imap AUTHENTICATE PLAIN'")
    # and by default with CRAM-MD5, the best mechanism Dovecot offers it
    third = fresh(family)
    assert curl(lab, mail_server, third, f"imap://{url_host(server)}/INBOX").returncode == 0
    gate.wait_for_log(rf"LOGIN client={re.escape(third)} .*user=alice reason='imap AUTHENTICATE CRAM-MD5'")
    assert logged_in(gate, other)[0].split()[-1] == "imap"


def test_an_inline_imap_login_with_a_wrong_password_learns_nothing(lab, mail_server, make_gate,
                                                                   fresh):
    gate = make_gate("forward")
    source, server = fresh(), lab.server.ipv4
    assert not imap_plain_login(lab, mail_server, source, server, password="wrong")
    gate.wait_for_log(rf"LOGIN-FAILED client={re.escape(source)} .*user=alice")
    assert logged_in(gate, source) == []
    assert_refused(lab, source, server)


def test_with_imap_ports_empty_an_imap_login_is_not_learned(lab, mail_server, make_gate, fresh):
    gate = make_gate("forward", imap_ports=[])
    source, server = fresh(), lab.server.ipv4
    assert imap_plain_login(lab, mail_server, source, server)
    time.sleep(0.5)
    assert logged_in(gate, source) == []
    assert_refused(lab, source, server)


# --- the post-login hook ------------------------------------------------------------------

HOOK_GROUP = "dovecot"  # the lab's post-login user is dovecot; a real host uses sapd-hook


@pytest.fixture
def hook_gate(make_gate, mail_server, request):
    mode = getattr(request, "param", "forward")
    return make_gate(mode, login_hook=str(mail_server.state_dir / "hook" / "login.sock"),
                     login_hook_group=HOOK_GROUP)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hook_gate", ["forward", "input"], indirect=True)
@pytest.mark.parametrize("how", ["curl-imaps", "poplib-ssl"])
def test_a_tls_login_told_by_the_post_login_hook_lets_the_relay_pass(lab, mail_server, hook_gate,
                                                                     fresh, family, how):
    source, server = fresh(family), lab.server.address(family)
    assert_refused(lab, source, server)
    assert login_over_tls(how, lab, mail_server, source, server)
    hook_gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason=hook",
                           timeout=LEARN_TIMEOUT)
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    assert logged_in(hook_gate, source)[0].split()[-1] == "hook"


def test_a_wrong_password_runs_no_hook(lab, mail_server, hook_gate, fresh):
    source, server = fresh(), lab.server.ipv4
    assert not login_over_tls("curl-imaps", lab, mail_server, source, server, password="wrong")
    control = fresh()
    assert login_over_tls("curl-imaps", lab, mail_server, control, server)
    hook_gate.wait_for_log(rf"LOGIN client={re.escape(control)} ", timeout=LEARN_TIMEOUT)
    assert logged_in(hook_gate, source) == []
    assert_refused(lab, source, server)


def test_with_the_hook_off_nothing_is_learned(lab, mail_server, make_gate, fresh):
    gate = make_gate("forward")
    source, server = fresh(), lab.server.ipv4
    assert login_over_tls("curl-imaps", lab, mail_server, source, server)  # the login still works
    time.sleep(1.0)
    assert logged_in(gate, source) == []
    assert_refused(lab, source, server)


HOOK_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    s.sendall(("LOGIN " + sys.argv[2] + " mallory\\n").encode())
    print(s.recv(64).decode().strip())
except OSError as exc:
    print(type(exc).__name__)
"""


def hook_as(lab, user: str, group: str, socket_path: str, address: str) -> str:
    argv = ["setpriv", f"--reuid={user}", f"--regid={group}", "--clear-groups",
            "/usr/bin/python3", "-c", HOOK_CLIENT, socket_path, address]  # not a root-only shim
    return lab.run("server", argv, capture_output=True, text=True, check=True).stdout.strip()


def test_another_unprivileged_user_cannot_use_the_hook(lab, mail_server, hook_gate, fresh):
    path = str(mail_server.state_dir / "hook" / "login.sock")
    st = os.stat(path)
    assert (st.st_mode & 0o777, st.st_uid, grp.getgrgid(st.st_gid).gr_name) == (0o660, 0, HOOK_GROUP)
    victim, server = fresh(), lab.server.ipv4
    assert hook_as(lab, "nobody", "nogroup", path, victim) == "PermissionError"
    assert logged_in(hook_gate, victim) == []
    assert_refused(lab, victim, server)
    # the post-login user can, and only with the one request it takes
    assert hook_as(lab, "dovecot", HOOK_GROUP, path, "not-an-address").startswith("ERR")
    assert hook_as(lab, "dovecot", HOOK_GROUP, path, victim) == "OK"
    assert logged_in(hook_gate, victim)[0].split()[-1] == "hook"
