"""The systemd journal as a login source, with a real journald and a real Dovecot.

The lab runs without systemd, so the test starts systemd-journald itself in a
mount namespace of its own: a tmpfs over /run/systemd holds its sockets, and
its runtime journal (/run/log there) is a directory of this test, which the
gate reads with `login_logs = ["journal:DIR"]`. A second Dovecot, on IMAPS
port 10993 in the server namespace, logs to that journald as it does under
systemd (its stderr is a journal stream: systemd-cat). A local user who
writes a Dovecot success line to the journal with `logger -t dovecot` must
open nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from lab_gate import CLIENT_TIMEOUT, relay_denied, try_rcpt, wait_until

from sapd_nfq.engine.loglines import JOURNAL_EXES, parse_line

pytestmark = pytest.mark.lab

PORT = 10993
LOCAL = "alice@lab.example"
LEARN_TIMEOUT = 10.0
START_TIMEOUT = 15.0
NOBODY = "65534"

JOURNALD = """set -eu
mount -t tmpfs tmpfs /run/systemd
mkdir /run/systemd/journal
mount --bind {log} /run/log
/lib/systemd/systemd-journald &
echo $! > {pid}
until [ -S /run/systemd/journal/stdout ]; do sleep 0.1; done
exec ip netns exec {netns} systemd-cat --identifier=dovecot dovecot -F -c {conf}
"""

DOVECOT = """!include {lab_conf}
instance_name = sapd-journal
base_dir = {base}/run
state_dir = {base}/state
log_path = /dev/stderr
service pop3-login {{
  inet_listener pop3 {{
    port = 0
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
  }}
}}
"""


def external() -> str:
    return f"relay-{uuid.uuid4().hex[:10]}@external.example"


@pytest.fixture
def journal(lab, mail_server, tmp_path):
    """journald and the Dovecot that logs to it; yields the journal files' directory."""
    base = tmp_path / "journal"
    for sub in ("log", "run", "state"):
        (base / sub).mkdir(parents=True)
    conf = base / "dovecot.conf"
    conf.write_text(DOVECOT.format(lab_conf=mail_server.state_dir / "dovecot" / "dovecot.conf",
                                   base=base, port=PORT))
    script = base / "start.sh"
    script.write_text(JOURNALD.format(log=base / "log", pid=base / "journald.pid",
                                      netns=lab.server.netns, conf=conf))
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", str(script)],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        machine = Path("/etc/machine-id").read_text().strip()
        files = base / "log" / "journal" / machine
        wait_until(lambda: proc.poll() is not None or _listening(lab, PORT), START_TIMEOUT,
                   "the journal's Dovecot to listen", interval=0.1)
        assert proc.poll() is None, proc.stderr.read().decode()
        yield files, int((base / "journald.pid").read_text())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
        proc.stderr.close()


def _listening(lab, port: int) -> bool:
    done = lab.run("server", ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
    return str(port) in done.stdout


def _entries(files: Path) -> list[dict]:
    done = subprocess.run(["journalctl", "--directory", str(files), "--output=json"],
                          capture_output=True, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def _imaps(lab, mail_server, source: str, password: str) -> subprocess.CompletedProcess:
    return lab.run("client", ["curl", "-sS", "--max-time", str(int(CLIENT_TIMEOUT) * 2),
                              "--interface", source, "--cacert", str(mail_server.cert),
                              "--user", f"alice:{password}",
                              f"imaps://{lab.server.ipv4}:{PORT}/INBOX"],
                   capture_output=True, text=True, check=False)


def test_dovecot_in_the_journal_opens_the_relay_and_a_forged_entry_does_not(
        lab, mail_server, make_gate, fresh, journal):
    files, journald = journal
    gate = make_gate("forward", login_logs=[f"journal:{files}"])
    server = lab.server.ipv4

    # The attack: a local user writes a Dovecot success line for its address.
    forged = fresh()
    line = (f"imap-login: Login: user=<alice>, method=PLAIN, rip={forged}, lip={server}, "
            "mpid=4242, TLS, session=<Zm9yZ2VkCg>")
    subprocess.run(["nsenter", "--mount", "--target", str(journald), "setpriv",
                    f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                    "logger", "--journald"],
                   input=f"SYSLOG_IDENTIFIER=dovecot\nMESSAGE={line}\n", text=True, check=True)
    # It is in the journal as "dovecot", and a reader that went by the message alone
    # would take it for a login.
    wait_until(lambda: any(e.get("MESSAGE") == line for e in _entries(files)), LEARN_TIMEOUT,
               "the forged entry in the journal", interval=0.2)
    entry = next(e for e in _entries(files) if e.get("MESSAGE") == line)
    assert entry["SYSLOG_IDENTIFIER"] == "dovecot" and entry["_UID"] == NOBODY
    assert parse_line(line.encode()).address == forged

    # A real login over IMAPS: Dovecot's own entry opens the relay for its address.
    source = fresh()
    done = _imaps(lab, mail_server, source, mail_server.users["alice"])
    assert done.returncode == 0, done.stderr
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*log:dovecot", timeout=LEARN_TIMEOUT)
    assert try_rcpt(lab, source, server, LOCAL, external()) is None
    ours = [e for e in _entries(files) if f"rip={source}," in str(e.get("MESSAGE"))]
    assert ours and all(e["_EXE"] in JOURNAL_EXES and e["_UID"] == "0" for e in ours), ours

    # The forged line was read before the real one and learned nothing.
    assert not re.search(rf"LOGIN client={re.escape(forged)} ", gate.log())
    assert relay_denied(str(try_rcpt(lab, forged, server, LOCAL, external())))

    # A wrong password learns nothing either.
    wrong = fresh()
    assert _imaps(lab, mail_server, wrong, "not-the-password").returncode != 0
    time.sleep(1.0)  # the journal poll runs every 0.2 s: give a wrong line time to be read
    assert not re.search(rf"LOGIN client={re.escape(wrong)} ", gate.log())
    assert relay_denied(str(try_rcpt(lab, wrong, server, LOCAL, external())))
