"""The journal as a login source: which entries count, and the journalctl child."""

from __future__ import annotations

import json
import sys
import time

from dovecot_lines import login

from sapd_nfq.engine.loglines import MAX_JOURNAL_ENTRY, journal_entry, parse_line
from sapd_nfq.learners.logs import JournalFollower
from sapd_nfq.wiring.config import load_config

LOGIN = login(prefix="", info="").decode()
DOVECOT = {"_UID": "0", "_EXE": "/usr/lib/dovecot/log", "_COMM": "log",
           "SYSLOG_IDENTIFIER": "dovecot", "MESSAGE": LOGIN, "__CURSOR": "s=1;i=1"}


def entry(**fields: object) -> bytes:
    return json.dumps({**DOVECOT, **fields}).encode()


def test_an_entry_dovecot_wrote_gives_its_message_and_cursor():
    got = journal_entry(entry())
    assert got is not None and got.cursor == "s=1;i=1" and got.message == LOGIN.encode()
    assert parse_line(got.message).address == "198.18.1.2"
    unit = journal_entry(entry(_EXE="/usr/sbin/dovecot-other", _SYSTEMD_UNIT="dovecot.service"))
    assert unit is not None and unit.message == LOGIN.encode()


def test_logger_posing_as_dovecot_counts_for_nothing():
    # `logger -t dovecot`: the identifier is the writer's to choose, the _ fields are journald's
    for forged in (entry(_EXE="/usr/bin/logger", _COMM="logger"),
                   entry(_UID="1000"),
                   entry(_UID="1000", _SYSTEMD_UNIT="dovecot.service"),
                   entry(_EXE=["/usr/lib/dovecot/log", "/usr/bin/logger"]),
                   entry(_UID=None)):
        got = journal_entry(forged)
        assert got is not None and got.message is None, forged


def test_a_message_that_is_not_utf8_comes_as_its_octets():
    got = journal_entry(entry(MESSAGE=list(b"imap-login: \xff")))
    assert got is not None and got.message == b"imap-login: \xff"
    assert journal_entry(entry(MESSAGE=[300])).message is None


def test_what_is_not_an_entry_is_nothing():
    assert journal_entry(b"not json") is None
    assert journal_entry(b"[1, 2]") is None
    assert journal_entry(entry(MESSAGE="x" * MAX_JOURNAL_ENTRY)) is None


def test_the_config_names_the_journal_or_a_directory_of_journal_files(tmp_path):
    path = tmp_path / "sapd-nfq.toml"
    path.write_text('login_logs = ["journal", "journal:remote", "dovecot.log"]\n')
    assert load_config(path).login_logs == ("journal", f"journal:{tmp_path}/remote",
                                            tmp_path / "dovecot.log")


# --- the journalctl child ------------------------------------------------------------
# A stand-in that prints what journalctl would, and records the arguments it was given.

STAND_IN = """
import json, sys
with open(sys.argv[1], "a") as calls:
    calls.write(json.dumps(sys.argv[2:]) + "\\n")
for line in open(sys.argv[2]):
    sys.stdout.write(line)
sys.stdout.flush()
"""


def read_until(follower, count, timeout=10.0):
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += follower.read_lines()
        time.sleep(0.01)
    return got


STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.stdout.write(open(sys.argv[1]).read())
sys.stdout.flush()
os.close(1)
time.sleep(60)
"""


def test_a_journalctl_that_ends_is_never_waited_for_and_is_killed_if_it_lingers(
        tmp_path, monkeypatch, caplog):
    # A wait on the stubborn child would last STOP_TIMEOUT: long enough that no
    # busy machine's slowness passes for it.
    monkeypatch.setattr("sapd_nfq.learners.logs.STOP_TIMEOUT", 5.0)
    script, out = tmp_path / "journalctl.py", tmp_path / "out"
    script.write_text(STUBBORN)
    out.write_bytes(entry() + b"\n")
    follower = JournalFollower("journal", command=(sys.executable, str(script), str(out)))
    try:
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while "closed its output" not in caplog.text and time.monotonic() < deadline:
            started = time.monotonic()
            got += follower.read_lines()  # its output ends here: the loop must not wait on it
            assert time.monotonic() - started < 4
        assert got == [LOGIN.encode()]
        [(child, _)] = follower._stopping
        assert child.poll() is None  # SIGTERM sent, and ignored
        while child.poll() is None and time.monotonic() < deadline:
            follower.read_lines()  # reaped by later calls: SIGKILL once STOP_TIMEOUT is past
            time.sleep(0.05)
        assert child.returncode == -9
    finally:
        follower.close()

def test_the_follower_reads_entries_resumes_at_the_cursor_and_restarts(tmp_path, monkeypatch):
    monkeypatch.setattr("sapd_nfq.learners.logs.RESTART_INTERVAL", 0.0)
    script, calls, out = tmp_path / "journalctl.py", tmp_path / "calls", tmp_path / "out"
    script.write_text(STAND_IN)
    out.write_bytes(entry() + b"\n" + entry(_EXE="/usr/bin/logger", __CURSOR="s=1;i=2") + b"\n")
    follower = JournalFollower("journal", command=(sys.executable, str(script), str(calls), str(out)))
    try:
        assert read_until(follower, 1) == [LOGIN.encode()]
        # the forged entry counts for nothing, but it is read: the cursor moves past it
        deadline = time.monotonic() + 10
        while follower.position != "s=1;i=2" and time.monotonic() < deadline:
            follower.read_lines()
        assert follower.position == "s=1;i=2"
        # the stand-in has exited: the next start goes on after the cursor
        out.write_bytes(entry(__CURSOR="s=1;i=3") + b"\n")
        assert read_until(follower, 1) == [LOGIN.encode()]
    finally:
        follower.close()
    starts = [json.loads(line) for line in calls.read_text().splitlines()]
    assert starts[0][-1] == "--lines=0" and "--follow" in starts[0]
    assert starts[1][-1] == "--after-cursor=s=1;i=2"
