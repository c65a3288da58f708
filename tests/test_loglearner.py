"""The log learner on real files: start at the end, rotation both ways, restarts,
long lines, renewal of open sessions, and how fast it reads."""

from __future__ import annotations

import os
import time

import dovecot_lines

from sapd_nfq.engine.logins import MemoryLoginStore
from sapd_nfq.engine.loglines import MAX_LINE
from sapd_nfq.learners.logs import SESSION_MAX, FileFollower, LogLearner


def login_line(address: str, user: str = "alice") -> bytes:
    """A login line as the log file holds it."""
    return dovecot_lines.login(user, address=address) + b"\n"


def end_line() -> bytes:
    return dovecot_lines.session_end() + b"\n"


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def learner(tmp_path, ttl=1800, store=None):
    store = store or MemoryLoginStore()
    return LogLearner([tmp_path / "dovecot.log"], store, ttl, tmp_path), store


def addresses(store, now):
    return sorted(login.address for login in store.entries(now))


def test_starts_at_the_end_and_learns_what_follows(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(login_line("198.18.1.1"))
    ll, store = learner(tmp_path)
    assert ll.poll(100.0) == []
    append(log, login_line("198.18.1.2"))
    [got] = ll.poll(101.0)
    assert got.address == "198.18.1.2"
    [login] = store.entries(101.0)
    assert (login.address, login.user, login.source) == ("198.18.1.2", "alice", "log:dovecot")


def test_a_file_created_later_is_read_from_its_start(tmp_path):
    ll, store = learner(tmp_path)
    assert ll.poll(100.0) == []
    (tmp_path / "dovecot.log").write_bytes(b"")
    ll.poll(100.0)
    append(tmp_path / "dovecot.log", login_line("198.18.1.2"))
    assert [e.address for e in ll.poll(101.0)] == ["198.18.1.2"]


def test_partial_lines_wait_for_their_end(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path)
    ll.poll(100.0)
    line = login_line("198.18.1.2")
    append(log, line[:40])
    assert ll.poll(100.0) == []
    append(log, line[40:])
    assert len(ll.poll(100.0)) == 1


def test_rename_rotation_reads_the_old_file_to_its_end_then_the_new_one(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path)
    ll.poll(100.0)
    append(log, login_line("198.18.1.2"))
    os.rename(log, tmp_path / "dovecot.log.1")
    append(tmp_path / "dovecot.log.1", login_line("198.18.1.3"))  # written before the reopen
    assert [e.address for e in ll.poll(100.0)] == ["198.18.1.2", "198.18.1.3"]
    assert ll.poll(100.0) == []  # no new file yet
    append(log, login_line("198.18.1.4"))
    assert [e.address for e in ll.poll(100.0)] == []  # the switch is noticed at EOF
    assert [e.address for e in ll.poll(100.0)] == ["198.18.1.4"]


def test_copytruncate_reads_again_from_the_start(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path)
    ll.poll(100.0)
    append(log, login_line("198.18.1.2") * 3)
    assert len(ll.poll(100.0)) == 3
    with open(log, "r+b") as f:
        f.truncate(0)
    ll.poll(100.0)
    append(log, login_line("198.18.1.5"))
    assert [e.address for e in ll.poll(100.0)] == ["198.18.1.5"]


def test_a_restart_goes_on_where_it_stopped_and_learns_nothing_twice(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path)
    ll.poll(time.time())
    append(log, login_line("198.18.1.2"))
    assert len(ll.poll(time.time())) == 1
    ll.close()
    append(log, login_line("198.18.1.3"))  # while the daemon was down
    again, store2 = learner(tmp_path)
    assert [e.address for e in again.poll(time.time())] == ["198.18.1.3"]


def test_a_restart_after_longer_than_a_window_starts_at_the_end(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, _ = learner(tmp_path, ttl=60)
    ll.poll(time.time())
    ll.close()
    append(log, login_line("198.18.1.3"))
    old = time.time() - 120
    os.utime(tmp_path / "login-logs.json", (old, old))
    again, _ = learner(tmp_path, ttl=60)
    assert again.poll(time.time()) == []


def test_a_replaced_file_after_a_restart_starts_at_the_end(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(login_line("198.18.1.1"))
    ll, _ = learner(tmp_path)
    ll.poll(time.time())
    ll.close()
    log.unlink()  # the new file may get the old inode number back
    log.write_bytes(login_line("198.18.1.3", user="bob") * 2)
    again, _ = learner(tmp_path)
    assert again.poll(time.time()) == []


def test_a_line_too_long_is_dropped_whole(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, _ = learner(tmp_path)
    ll.poll(100.0)
    # the long line ends in a success line's text: none of it may be read as one
    append(log, b"x" * (MAX_LINE * 3) + login_line("198.18.6.6"))
    assert ll.poll(100.0) == []
    append(log, login_line("198.18.1.2"))
    assert [e.address for e in ll.poll(100.0)] == ["198.18.1.2"]


def test_open_sessions_are_renewed_until_their_end(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path, ttl=10)
    ll.poll(100.0)
    append(log, login_line("198.18.1.2"))
    ll.poll(100.0)
    for now in range(101, 160):  # an hour-long IDLE, in a 10 s window
        ll.poll(float(now))
        assert addresses(store, float(now)) == ["198.18.1.2"], now
    append(log, end_line())
    ll.poll(160.0)
    assert addresses(store, 162.0) == ["198.18.1.2"]  # the window runs out as usual
    assert addresses(store, 171.0) == []


def test_a_session_never_seen_ending_stops_renewing(tmp_path):
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path, ttl=600)
    ll.poll(0.0)
    append(log, login_line("198.18.1.2"))
    ll.poll(0.0)
    ll.poll(SESSION_MAX + 1)
    assert addresses(store, SESSION_MAX + 601) == []


def test_followers_of_a_missing_file_wait_for_it(tmp_path):
    follower = FileFollower(tmp_path / "nothing.log")
    assert follower.read_lines() == [] and follower.position is None


def test_reads_many_lines_quickly(tmp_path):
    """The figure in docs/login-sources.md: lines per second one poll loop keeps up with."""
    log = tmp_path / "dovecot.log"
    log.write_bytes(b"")
    ll, store = learner(tmp_path)
    ll.poll(100.0)
    noise = (b"Dec 02 04:44:31 imap(alice)<1><c2Vzc2lvbg>: Info: Connection closed in=0 out=0\n")
    count = 50_000
    append(log, (noise * 9 + login_line("198.18.1.2")) * (count // 10))
    start = time.perf_counter()
    while ll.lines < count:
        ll.poll(100.0)
    rate = count / (time.perf_counter() - start)
    assert ll.logins == count // 10
    print(f"\nlog learner: {rate:,.0f} lines/s")
    assert rate > 2_000  # a floor only: the machine is shared
