"""Faults on the live gate: the daemon killed mid-session, the virtusertable
rewritten under traffic, the kernel queue full. Each test prints the figure it
measured (`pytest -s` shows them).

The daemon is killed the way a crash or the OOM killer would (SIGKILL) and
brought back the way its systemd unit does (Restart=always after RestartSec,
read from packaging/sapd-nfq.service). Clients use timeouts far longer than
anything measured, so a hang shows as a timeout, never as a pass.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import uuid

import pytest
from lab_gate import (
    EXTERNAL,
    FILE_RELOAD_TIMEOUT,
    LOCAL,
    PostfixLog,
    SourcePOP3,
    Traffic,
    assert_relay_refused,
    assert_relayed,
    external,
    pop3_login,
    relay_denied,
    send_mail,
    smtp_session,
    try_rcpt,
    unit_restart_policy,
    wait_until,
)

from sapd_nfq.kernel.worker import REMOVAL_SETTLE
from sapd_nfq.wiring.filewatch import WATCH_INTERVAL

pytestmark = pytest.mark.lab

#: what a client waits before it calls the server hung: far above any figure here,
#: far below a mail client's own timeouts (Postfix waits 300 s for DATA)
HANG = 120.0
UPLOAD_CHUNK = (b"x" * 998 + b"\r\n") * 64  # 64 KiB of 1000-octet lines
UPLOADED_BEFORE_KILL = 1 << 20
LOCAL_USERS = ("alice@lab.example", "bob@lab.example")
CAROL = "carol@lab.example"  # not in the lab's table; Postfix has no mailbox for her
UNKNOWN_USER = "550 5.1.1"  # Postfix's own refusal: the RCPT got past the gate


@pytest.fixture
def supervised(make_gate):
    """A gate whose daemon is restarted like its systemd unit restarts it."""
    restart, restart_sec = unit_restart_policy()
    assert restart == "always", "the unit no longer restarts the daemon: these tests assume it does"

    def make(**settings: object):
        gate = make_gate(**settings)
        gate.supervise(restart_sec)
        return gate
    return make


def kill(gate) -> float:
    """SIGKILL the daemon and wait until it is gone; the monotonic time of the kill."""
    proc = gate.proc
    killed = time.monotonic()
    gate.send_signal(signal.SIGKILL)
    wait_until(lambda: proc.poll() is not None, 10.0, "the killed daemon to exit")
    return killed


def queue_ids(postfix: PostfixLog, source: str) -> list[str]:
    """Queue ids smtpd gave the sessions of `source`."""
    return [m.group(1) for line in postfix.lines()
            if (m := re.search(rf"smtpd\[\d+\]: ([0-9A-F]+): client=\S+\[{re.escape(source)}\]", line))]


# --- the daemon killed ---------------------------------------------------------------

def test_killed_mid_upload_the_client_is_reset_and_nothing_is_delivered(
        lab, mail_server, supervised, fresh):
    gate = supervised()
    source, server = fresh(), lab.server.ipv4
    postfix = PostfixLog(mail_server)
    before = len(mail_server.wait_for_mail("alice", 0))
    subject = f"upload-{uuid.uuid4().hex[:10]}"

    smtp = smtp_session(lab, source, server, timeout=HANG)
    assert smtp.mail(EXTERNAL)[0] == 250 and smtp.rcpt("alice@lab.example")[0] == 250
    assert smtp.docmd("DATA")[0] == 354
    uploading = threading.Event()
    outcome: dict[str, object] = {}

    def upload() -> None:
        sent = 0
        try:
            smtp.sock.sendall(f"Subject: {subject}\r\n\r\n".encode())
            while True:  # a steady upload: it is still going when the daemon dies
                smtp.sock.sendall(UPLOAD_CHUNK)
                sent += len(UPLOAD_CHUNK)
                if sent >= UPLOADED_BEFORE_KILL:
                    uploading.set()
                time.sleep(0.01)
        except OSError as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    assert uploading.wait(30), "the upload did not get going"
    killed = kill(gate)
    thread.join(HANG + 10)
    smtp.close()
    assert "error" in outcome, "the upload neither failed nor hung up"
    told = outcome["at"] - killed
    (exited, answering), = gate.restarts
    print(f"\nSIGKILL mid-upload: daemon answering again after {answering - killed:.2f} s, "
          f"client told after {told:.2f} s ({type(outcome['error']).__name__})")
    assert isinstance(outcome["error"], ConnectionResetError), outcome["error"]
    assert told < HANG / 2

    # Nothing half-delivered: smtpd lost the session before the final dot, and the
    # message never reached the queue manager, let alone the mailbox.
    postfix.wait_for(rf"lost connection after DATA .* from \S+\[{re.escape(source)}\]", timeout=30)
    qids = queue_ids(postfix, source)
    assert qids, postfix.lines()
    assert not [line for line in postfix.lines() if any("qmgr" in line and f"{q}:" in line for q in qids)]
    assert not any(subject in m.read_text(errors="replace")
                   for m in mail_server.wait_for_mail("alice", 0))

    # The next session from the same client is clean.
    assert send_mail(lab, source, server, EXTERNAL, "alice@lab.example", subject + "-again") is None
    messages = mail_server.wait_for_mail("alice", before + 1)
    assert sum(subject + "-again" in m.read_text(errors="replace") for m in messages) == 1
    assert len(messages) == before + 1
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())


@pytest.mark.parametrize("sent", ["while down", "after the restart"])
def test_killed_mid_pop3_login_the_client_logs_in_and_nothing_is_learned(
        lab, mail_server, supervised, fresh, sent):
    gate = supervised()
    source, server = fresh(), lab.server.ipv4
    with lab.inside("client"):
        pop = SourcePOP3(server, source, timeout=HANG)
    assert pop.user("alice").startswith(b"+OK")
    killed = kill(gate)
    if sent == "after the restart":
        wait_until(lambda: gate.restarts, HANG, "the daemon to be restarted")
    # While no daemon is bound, POP3 passes the queue (pop3_fail_open); after
    # the restart the session is one the daemon did not see open, and it lets
    # it leave the queue. Either way the client's session simply goes on.
    reply = pop.pass_(mail_server.users["alice"])
    answered = time.monotonic() - killed
    wait_until(lambda: gate.restarts, HANG, "the daemon to be restarted")
    messages = pop.stat()[0]
    pop.quit()
    print(f"\nSIGKILL after USER, PASS sent {sent}: +OK {answered:.2f} s after the kill")
    assert reply.startswith(b"+OK") and messages >= 0

    # That login was not learned, so it opens no relay.
    assert f"LOGIN client={source} " not in gate.log()
    assert gate.control("status")["counters"]["untracked"] >= 1
    done = gate.cli("check", "--client", source, "--from", LOCAL, "--to", external(), check=False)
    assert done.returncode == 1 and "row 3" in done.stdout, done.stdout
    assert_relay_refused(lab, mail_server, gate, source, server, LOCAL, external())
    # The next login from the same client is learned as ever.
    pop3_login(lab, mail_server, source, server)
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice reason='pop3 USER'")
    assert_relayed(lab, mail_server, source, server, LOCAL, external())


# --- the virtusertable rewritten under traffic -------------------------------------

def inbound(lab, source: str, server: str, tag: str):
    """A Traffic session: one message from outside to each local user in turn."""
    def session(i: int):
        return send_mail(lab, source, server, EXTERNAL, LOCAL_USERS[i % len(LOCAL_USERS)],
                         f"{tag}-{i}", timeout=HANG)
    return session


def assert_all_delivered(mail_server, traffic: Traffic, kind: str, tag: str) -> int:
    """Every `kind` session was taken, and each message reached its mailbox once."""
    outcomes = traffic.outcomes(kind)
    refused = [o.result for o in outcomes if o.result is not None]
    assert not refused, f"{len(refused)} of {len(outcomes)} refused: {refused[:5]}"
    for index, user in enumerate(("alice", "bob")):
        expected = {f"{tag}-{i}" for i in range(index, len(outcomes), 2)}

        def arrived(user=user, expected=expected):
            found = set()
            for m in mail_server.wait_for_mail(user, 0):
                match = re.search(rf"^Subject: ({re.escape(tag)}-\d+)$", m.read_text(errors="replace"), re.M)
                if match:
                    found.add(match.group(1))
            return found == expected
        wait_until(arrived, 30, f"every {kind} message in {user}'s mailbox")
    return len(outcomes)


def assert_local_at_the_gate(lab, gate, source: str, server: str, recipient: str) -> None:
    """The gate let the RCPT by as local (row 1): only Postfix refused it."""
    refused = try_rcpt(lab, source, server, EXTERNAL, recipient, timeout=HANG)
    assert refused is not None and str(refused).startswith(UNKNOWN_USER), refused


def test_a_table_replaced_by_rename_while_mail_flows(lab, mail_server, make_gate, fresh):
    gate = make_gate()
    source, prober, server = fresh(), fresh(), lab.server.ipv4
    tag = f"rename-{uuid.uuid4().hex[:8]}"
    original = gate.virtusertable.read_text()
    with Traffic() as traffic:
        traffic.run("inbound", inbound(lab, source, server, tag), pause=0.05)
        traffic.wait_for("inbound", 3, HANG)

        mark = len(gate.log_lines())
        gate.write_virtusertable(original + f"{CAROL}\talice\n")  # an editor's save
        gate.wait_for_log(r"reloaded \(file changed\): .*, 5 entries$", FILE_RELOAD_TIMEOUT, mark)
        assert_local_at_the_gate(lab, gate, prober, server, CAROL)
        gate.wait_for_log(rf"PASS client={re.escape(prober)} .*recipient='{CAROL}' row='row 1", after=mark)
        traffic.wait_for("inbound", 3, HANG)

        # Taken away again: a removal waits until the file has held still long.
        mark = len(gate.log_lines())
        renamed = time.monotonic()
        gate.write_virtusertable(original)
        gate.wait_for_log(rf"deferred: 1 addresses would stop being local \({CAROL}\)",
                          FILE_RELOAD_TIMEOUT, mark)
        assert_local_at_the_gate(lab, gate, prober, server, CAROL)
        gate.wait_for_log(r"reloaded \(file changed\): .*, 4 entries, 1 no longer local",
                          REMOVAL_SETTLE + FILE_RELOAD_TIMEOUT, mark)
        took = time.monotonic() - renamed
        assert took >= REMOVAL_SETTLE
        refused = try_rcpt(lab, prober, server, EXTERNAL, CAROL, timeout=HANG)
        assert relay_denied(str(refused)), refused
        traffic.wait_for("inbound", 3, HANG)
    sessions = assert_all_delivered(mail_server, traffic, "inbound", tag)
    print(f"\nrename: {sessions} inbound sessions across two renames, none refused; "
          f"the removal applied after {took:.1f} s")


def test_a_table_rewritten_in_place_with_a_stall_never_refuses_inbound_mail(
        lab, mail_server, make_gate, fresh):
    gate = make_gate()
    source, prober, server = fresh(), fresh(), lab.server.ipv4
    tag = f"partial-{uuid.uuid4().hex[:8]}"
    # The first half alone is a well-formed table in which alice and bob, whom
    # the traffic writes to, are not local.
    head = "# rewritten in place\npostmaster@lab.example\talice\n@lab.example\terror:nouser User unknown\n"
    tail = "".join(f"{user}\t{user.split('@')[0]}\n" for user in LOCAL_USERS) + f"{CAROL}\talice\n"
    with Traffic() as traffic:
        traffic.run("inbound", inbound(lab, source, server, tag), pause=0.05)
        traffic.wait_for("inbound", 3, HANG)
        mark = len(gate.log_lines())
        with open(gate.virtusertable, "w") as table:  # truncates, then the first half
            table.write(head)
            table.flush()
            os.fsync(table.fileno())
            stalled = time.monotonic()
            # The writer stalls longer than the watch and settle intervals:
            # the daemon reads the half and holds it back.
            gate.wait_for_log(r"deferred: 2 addresses would stop being local", FILE_RELOAD_TIMEOUT, mark)
            time.sleep(max(0.0, 3 * WATCH_INTERVAL - (time.monotonic() - stalled)))
            traffic.wait_for("inbound", 2, HANG)
            table.write(tail)
        gate.wait_for_log(r"reloaded \(file changed\): .*, 5 entries$", FILE_RELOAD_TIMEOUT, mark)
        assert_local_at_the_gate(lab, gate, prober, server, CAROL)  # the second half took effect
        traffic.wait_for("inbound", 3, HANG)
    sessions = assert_all_delivered(mail_server, traffic, "inbound", tag)
    print(f"\npartial write: stalled {time.monotonic() - stalled:.1f} s after the first half; "
          f"{sessions} inbound sessions, none refused")


# --- the kernel queue full ---------------------------------------------------------

def test_a_full_queue_drops_counts_and_recovers(lab, mail_server, make_gate, fresh):
    maxlen = 16
    gate = make_gate(queue_maxlen=maxlen)
    server = lab.server.ipv4
    tag = f"full-{uuid.uuid4().hex[:8]}"
    pid = gate.pid
    dropped_before = gate.kernel_queue()["queue_dropped"]
    relayed_to: list[str] = []

    def relay(source: str):
        def session(_: int):
            relayed_to.append(recipient := external())
            return send_mail(lab, source, server, LOCAL, recipient, "relay", timeout=HANG)
        return session

    with Traffic() as traffic:
        for i in range(6):
            traffic.run(f"inbound-{i}", inbound(lab, fresh(), server, f"{tag}{i}"), pause=0.05)
        for _ in range(2):
            traffic.run("relay", relay(fresh()))
        traffic.wait_for("inbound-0", 2, HANG)
        gate.send_signal(signal.SIGSTOP)
        try:
            full = wait_until(lambda: (q := gate.kernel_queue())["waiting"] >= maxlen
                              and q["queue_dropped"] > dropped_before and q, 30, "the queue to overflow")
            time.sleep(3.0)  # clients keep retransmitting into the full queue
            stopped = gate.kernel_queue()
        finally:
            gate.send_signal(signal.SIGCONT)
        resumed = len(traffic.log)
        for i in range(6):
            traffic.wait_for(f"inbound-{i}", 2, HANG)
        traffic.wait_for("relay", 2, HANG)
    dropped = gate.kernel_queue()["queue_dropped"] - dropped_before
    _, status = gate.status()
    assert status["workers"][0]["kernel"]["queue_dropped"] - dropped_before == dropped  # `status` counts them

    sessions = sum(assert_all_delivered(mail_server, traffic, f"inbound-{i}", f"{tag}{i}") for i in range(6))
    relays = traffic.outcomes("relay")
    assert relays and all(relay_denied(str(o.result)) for o in relays), \
        [o.result for o in relays if not relay_denied(str(o.result))]
    postfix_log = mail_server.postfix_log.read_text(errors="replace")
    assert not [r for r in relayed_to if r in postfix_log]
    assert gate.pid == pid and gate.running
    print(f"\nqueue full (queue_maxlen {maxlen}): waiting {full['waiting']}, {dropped} packets dropped "
          f"({stopped['queue_dropped'] - dropped_before} while stopped); {len(traffic.log) - resumed} sessions "
          f"after SIGCONT; {sessions} inbound taken, {len(relays)} relays refused")
