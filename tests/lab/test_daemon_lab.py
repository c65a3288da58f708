"""The daemon on live traffic: real clients, the lab's Postfix and Dovecot.

Each test runs `sapd-nfq up` and `sapd-nfq run` with a config of its own,
in gw (mode "forward", clients on to-client) or in the server namespace
(mode "input"), and `sapd-nfq down` afterwards; every test ends by checking
that the daemon stopped cleanly on SIGTERM, logged no traceback and no
password, and that the mangle table is as it was before `up`. Clients start from pool addresses of their own, so a login
in one test never lets another relay.

A refusal is judged from both ends: the client reads a `550` telling it to log in, and
Postfix never received the RCPT (smtpd's closing line counts every command
it read, and no log line names the recipient).
"""

from __future__ import annotations

import math
import re
import signal
import socket
import time
import uuid
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import (
    EXTERNAL,
    FILE_RELOAD_TIMEOUT,
    LOCAL,
    Gate,
    PostfixLog,
    assert_relay_refused,
    assert_relayed,
    curl_pop3_plain,
    external,
    mangle_rules,
    pop3_login,
    relay_denied,
    smtp_session,
    swaks,
    try_rcpt,
    wait_until,
)

from sapd_nfq.kernel.marks import BYPASS_MARK
from sapd_nfq.kernel.rules import MAILBOX_CHAIN

pytestmark = pytest.mark.lab

FAMILIES = [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")]
MODES = [pytest.param("forward", id="forward"), pytest.param("input", id="input")]
# The relay table on plain links and with offloads and GRO on: the gate then judges
# super-packets of up to 64 KB.
LINKS = [pytest.param((1500, False), id="offloads-off"), pytest.param((1500, True), id="offloads-on")]


@pytest.fixture
def gate(request, make_gate):
    return make_gate(getattr(request, "param", "forward"))


def settled_packets(gate: Gate, family: int) -> int:
    """Packets of POP3 flows let by on their connmark: the flow had left the queue."""
    _, status = gate.status()
    rule = f"-m connmark --mark {BYPASS_MARK:#x}/{BYPASS_MARK:#x} -j RETURN"
    table = status["rules"]["ipv6" if family == AF_INET6 else "ipv4"]
    return sum(r["packets"] for r in table["rules"] if r["chain"] == MAILBOX_CHAIN and r["rule"] == rule)


# --- the relay table ------------------------------------------------------------------

@pytest.mark.parametrize("links", LINKS, indirect=True)
def test_mail_to_a_local_recipient_is_delivered(lab, mail_server, gate, fresh, links):
    source = fresh()
    for sender, user in ((EXTERNAL, "alice"), (LOCAL, "bob")):  # row 1: any sender
        before = len(mail_server.wait_for_mail(user, 0))
        subject = f"inbound-{uuid.uuid4().hex[:10]}"
        done = swaks(lab, source, lab.server.ipv4, sender, f"{user}@lab.example", subject)
        assert done.returncode == 0 and "250 2.0.0 Ok: queued" in done.stdout, done.stdout
        messages = mail_server.wait_for_mail(user, before + 1)
        assert any(subject in m.read_text(errors="replace") for m in messages)
        gate.wait_for_log(rf"PASS client={re.escape(source)} .*sender='{sender}' "
                          rf"recipient='{user}@lab.example' row='row 1")


@pytest.mark.parametrize("links", LINKS, indirect=True)
def test_local_sender_to_external_without_login_is_refused(lab, mail_server, gate, fresh, links):
    source, recipient = fresh(), external()
    postfix = PostfixLog(mail_server)
    done = swaks(lab, source, lab.server.ipv4, LOCAL, recipient, "no login")
    assert relay_denied(done.stdout), done.stdout
    assert "rcpt=" not in postfix.disconnect(source)
    assert postfix.mentions(recipient) == []
    gate.wait_for_log(rf"FAIL client={re.escape(source)} .* row='row 3")
    assert_relay_refused(lab, mail_server, gate, source, lab.server.ipv4, LOCAL, external())


@pytest.mark.parametrize("links", LINKS, indirect=True)
def test_a_pipelined_relay_attempt_is_refused(lab, mail_server, gate, fresh, links):
    # MAIL, RCPT and DATA arrive in one segment: the RCPT alone is refused
    # (refusal = "recipient"); Postfix got the NOOP it became, never the address.
    source, recipient = fresh(), external()
    postfix = PostfixLog(mail_server)
    done = swaks(lab, source, lab.server.ipv4, LOCAL, recipient, "pipelined", "--pipeline")
    assert relay_denied(done.stdout), done.stdout
    closing = postfix.disconnect(source)
    assert "rcpt=" not in closing and " noop=1 " in closing, closing
    assert postfix.mentions(recipient) == []


@pytest.mark.parametrize("links", LINKS, indirect=True)
def test_external_to_external_is_refused_even_after_login(lab, mail_server, gate, fresh, links):
    source, server = fresh(), lab.server.ipv4
    pop3_login(lab, mail_server, source, server)
    assert_relay_refused(lab, mail_server, gate, source, server, EXTERNAL, external())  # row 4
    assert_relayed(lab, mail_server, source, server, LOCAL, external())  # row 2, same client


# --- learning logins --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gate", MODES, indirect=True)
def test_relay_after_a_pop3_user_pass_login(lab, mail_server, gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    pop3_login(lab, mail_server, source, server)
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='pop3 USER'")
    assert settled_packets(gate, family) > 0  # after the +OK, the session left the queue
    assert_relayed(lab, mail_server, source, server, LOCAL, external())
    gate.wait_for_log(rf"PASS client={re.escape(source)} .* row='row 2")


@pytest.mark.parametrize("family", FAMILIES)
def test_relay_after_a_pop3_auth_plain_login(lab, mail_server, gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    done = curl_pop3_plain(lab, mail_server, source, server)
    assert done.returncode == 0, done.stderr
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='pop3 AUTH PLAIN'")
    assert_relayed(lab, mail_server, source, server, LOCAL, external())


def test_a_failed_pop3_login_grants_nothing(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    done = curl_pop3_plain(lab, mail_server, source, server, password="not-the-password")
    assert done.returncode != 0
    gate.wait_for_log(rf"LOGIN-FAILED client={re.escape(source)} .*user=alice")
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())


def test_the_login_window_expires(lab, mail_server, make_gate, fresh):
    source, server = fresh(), lab.server.ipv4
    # The window must hold the login and the relay after it: sized from how long the
    # two take here without the gate (twice, plus a second), so a slow machine passes.
    began = time.monotonic()
    pop3_login(lab, mail_server, source, server)
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    ttl = max(2, math.ceil(2 * (time.monotonic() - began)) + 1)
    gate = make_gate(auth_ttl=ttl)
    logged_in = time.time()
    pop3_login(lab, mail_server, source, server)
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    refused = wait_until(lambda: try_rcpt(lab, source, server, LOCAL, external()),
                         ttl + 5, "the login window to close", interval=0.2)
    assert time.time() - logged_in >= ttl
    assert relay_denied(str(refused))
    gate.wait_for_log(rf"FAIL client={re.escape(source)} .* row='row 3")


# --- reload, restart, crash -----------------------------------------------------------

def test_reload_keeps_flows_and_logins_and_a_broken_table_changes_nothing(
        lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    carol = "carol@lab.example"
    pop3_login(lab, mail_server, source, server)
    # An SMTP session opened before every reload below, and used after them.
    held = smtp_session(lab, source, server)
    assert held.mail(EXTERNAL)[0] == 250
    # The table's "@lab.example error:" catch-all makes carol non-local: row 4.
    assert_relay_refused(lab, mail_server, gate, source, server, carol, external())

    original = gate.virtusertable.read_text()
    mark = len(gate.log_lines())
    gate.write_virtusertable(original + f"{carol}\talice\n")
    gate.wait_for_log(r"reloaded \(file changed\)", timeout=FILE_RELOAD_TIMEOUT, after=mark)
    assert_relayed(lab, mail_server, source, server, carol, external())  # row 2: login kept

    mark = len(gate.log_lines())
    broken_line = original.count("\n") + 1
    gate.write_virtusertable(original + f"{carol}\n")  # a key without a value
    where = f"{gate.virtusertable}:{broken_line}"
    gate.wait_for_log(rf"ERROR reload \(file changed\) failed, keeping .*{re.escape(where)}",
                      timeout=FILE_RELOAD_TIMEOUT, after=mark)
    assert where in gate.control("status")["last_reload_error"]
    assert_relayed(lab, mail_server, source, server, carol, external())  # the old table
    done = gate.cli("reload", check=False)
    assert done.returncode == 1 and where in done.stdout, done.stdout + done.stderr

    gate.write_virtusertable(original)
    done = gate.cli("reload")
    assert "queue 0: reloaded, 4 virtusertable entries" in done.stdout, done.stdout
    assert_relay_refused(lab, mail_server, gate, source, server, carol, external())
    mark = len(gate.log_lines())
    gate.send_signal(signal.SIGHUP)
    gate.wait_for_log(r"reloaded \(SIGHUP\)", after=mark)

    assert held.rcpt("bob@lab.example")[0] == 250
    before = len(mail_server.wait_for_mail("bob", 0))
    assert held.data(b"Subject: held across reloads\r\n\r\nstill inspected\r\n")[0] == 250
    held.quit()
    mail_server.wait_for_mail("bob", before + 1)


def test_a_restart_keeps_the_logins(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    pop3_login(lab, mail_server, source, server)
    assert gate.stop() == 0
    gate.start()
    assert gate.control("status")["logins_held"] == 1
    assert_relayed(lab, mail_server, source, server, LOCAL, external())


def test_a_killed_daemon_blocks_smtp_and_lets_pop3_by(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    pop3_login(lab, mail_server, source, server)
    gate.stop(signal.SIGKILL)
    postfix = PostfixLog(mail_server)
    with lab.inside("client"):
        with pytest.raises(TimeoutError):  # SMTP fails closed: the SYN never gets through
            socket.create_connection((server, 25), timeout=1.0, source_address=(source, 0))
    assert pop3_login(lab, mail_server, source, server) >= 0  # POP3 fails open
    assert postfix.mentions(f"[{source}]") == []
    gate.start()  # and relaying resumes with the login the store kept
    assert_relayed(lab, mail_server, source, server, LOCAL, external())


@pytest.mark.parametrize("gate", MODES, indirect=True)
def test_down_leaves_no_rule_behind(lab, mail_server, gate):
    source, server = lab.client.ipv4, lab.server.ipv4
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    pop3_login(lab, mail_server, source, server)  # a flow that left the queue by connmark
    assert gate.stop() == 0
    gate.down()
    assert mangle_rules(lab, gate.host) == gate.rules_before
    gate.down()  # again: nothing left to remove, no error
    code, status = gate.status()
    assert code == 3 and not status["rules_installed"] and not status["daemon_running"]


# --- the command line beside the running daemon -----------------------------------

def test_status_while_running_and_after_a_kill(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    pop3_login(lab, mail_server, source, server)
    assert_relayed(lab, mail_server, source, server, LOCAL, external())

    code, status = gate.status()
    assert code == 0 and status["rules_installed"] and status["daemon_running"]
    assert status["rules"]["ipv4"]["installed"] and status["rules"]["ipv6"]["installed"]
    (worker,) = status["workers"]
    assert worker["running"] and worker["mode"] == "forward"
    assert worker["decisions"] == {"pass": 1, "fail": 1, "would_fail": 0}
    assert worker["counters"]["logins"] == 1 and worker["counters"]["packets"] > 0
    assert worker["logins_held"] == 1 and status["logins_held"] == 1
    assert worker["logins_by_source"] == status["logins_by_source"] == {"pop3": 1}
    assert worker["kernel"]["queue_dropped"] == 0 and worker["kernel"]["id_sequence"] > 0
    receive = worker["receive"]
    assert (receive["gso"], receive["overruns"], receive["cut"], receive["verdict_errors"]) == (True, 0, 0, 0)
    assert receive["batches"] > 0  # the plain accepts went in batch verdicts
    assert "GSO on, truncated 0, receive buffer full 0 times, accepts in" in gate.cli("status").stdout

    gate.stop(signal.SIGKILL)
    code, status = gate.status()
    assert code == 3 and status["rules_installed"] and not status["daemon_running"]
    assert status["workers"][0]["running"] is False
    assert status["logins_held"] == 1  # read from the store itself
    assert status["logins_by_source"] == {"pop3": 1}


def test_auth_add_and_del_change_the_next_decision(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    gate.cli("auth", "add", source, "--user", "admin-granted", "--ttl", "600")
    assert source in gate.cli("auth", "list").stdout
    assert_relayed(lab, mail_server, source, server, LOCAL, external())
    gate.cli("auth", "del", source)
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
