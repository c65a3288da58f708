"""The login store's faults on the live daemon: Redis black-holed, killed and
restarted; the SQLite file on a full disk, read-only, corrupt.

Redis runs in the server namespace, bound to the server's lab address, with a
password and an append-only file, and is the gate's `state` (the gate in gw,
mode forward). In each state, while relay attempts from addresses that never
logged in keep arriving (relay_flood.py, four at a time), inbound sessions (a
message to a local user) are timed one after another and their p50 and p99
printed; every relay attempt must be refused. Speed belongs to the benchmark:
the one bound asserted is the property itself, that no session waits on the
store (each under 3 s while Redis is black-holed, where a single lookup on the
packet path would hold the whole queue for the 2 s socket timeout).
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lab_gate import (
    EXTERNAL,
    LOCAL,
    REPO,
    assert_relay_refused,
    assert_relayed,
    external,
    pop3_login,
    send_mail,
    try_rcpt,
    wait_until,
)

from sapd_nfq.lab import Lab

pytestmark = pytest.mark.lab

SESSIONS = 30  # inbound sessions timed in each state
SESSION_TIMEOUT = 30.0  # long enough to time a stalled session rather than lose it
NO_STALL = 3.0  # seconds: above any session that does not wait on the store
FLOODERS = 4
RECOVERY_TIMEOUT = 30.0  # the store's return seen and the pending writes done
INBOUND_TO = "alice@lab.example"
FLOOD = Path(__file__).with_name("relay_flood.py")


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: with fewer than 100 values, p99 is the slowest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class LabRedis:
    """redis-server in the server namespace on its lab address: a password, an
    append-only file (fsync always, so a SIGKILL loses no acknowledged write)."""

    PORT = 6379
    PASSWORD = "lab-only-redis-secret"

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.address = lab.server.ipv4
        self.dir = workdir
        self.proc: subprocess.Popen | None = None
        self.black_holed = False

    @property
    def url(self) -> str:
        return f"redis://:{self.PASSWORD}@{self.address}:{self.PORT}/0"

    def start(self) -> None:
        self.proc = self.lab.spawn("server", [
            "redis-server", "--bind", self.address, "--port", str(self.PORT),
            "--requirepass", self.PASSWORD, "--protected-mode", "no", "--dir", str(self.dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "",
            "--logfile", str(self.dir / "redis.log")], stdout=subprocess.DEVNULL)
        wait_until(lambda: self.cli("PING", check=False) == "PONG", 10, "redis-server to answer")

    def kill(self) -> None:
        assert self.proc is not None
        self.lab.stop(self.proc, signal.SIGKILL)
        self.proc = None

    def stop(self) -> None:
        if self.black_holed:
            self.restore()
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None

    def cli(self, *args: str, check: bool = True) -> str:
        done = self.lab.run("server", ["redis-cli", "-h", self.address, "-p", str(self.PORT),
                                       "--no-auth-warning", "-a", self.PASSWORD, *args],
                            capture_output=True, text=True, check=check, timeout=10)
        return done.stdout.strip()

    def has_login(self, address: str) -> bool:
        return self.cli("EXISTS", f"sapd-nfq:login:{address}") == "1"

    def _rules(self, action: str) -> None:
        # Both directions on the link to the gateway: nothing gets through, nothing is refused.
        for chain, side, port in (("INPUT", "-i", "--dport"), ("OUTPUT", "-o", "--sport")):
            self.lab.run("server", ["iptables", action, chain, side, "to-gw", "-p", "tcp",
                                    port, str(self.PORT), "-j", "DROP"])

    def black_hole(self) -> None:
        self._rules("-I")
        self.black_holed = True

    def restore(self) -> None:
        self._rules("-D")
        self.black_holed = False


@pytest.fixture
def lab_redis(lab, tmp_path):
    redis = LabRedis(lab, tmp_path / "redis")
    redis.dir.mkdir()
    redis.start()
    yield redis
    redis.stop()


class RelayFlood:
    """relay_flood.py in the client namespace while the block runs; then
    `outcomes` holds every attempt it made."""

    def __init__(self, lab: Lab, server: str, sources: list[str], out: Path) -> None:
        self.lab = lab
        self.argv = [sys.executable, str(FLOOD), "--server", server, "--sender", LOCAL,
                     "--timeout", str(SESSION_TIMEOUT), *sources]
        self.out = out
        self.outcomes: list[dict] = []

    def __enter__(self) -> RelayFlood:
        with open(self.out, "wb") as out:
            self.proc = self.lab.spawn("client", self.argv, stdout=out, cwd=REPO)
        wait_until(lambda: self.out.stat().st_size > 0, 20, "the first relay attempt")
        return self

    def __exit__(self, *exc: object) -> None:
        self.lab.stop(self.proc)
        self.outcomes = [json.loads(line) for line in self.out.read_text().splitlines()
                         if line.endswith("}")]


def timed_inbound(lab: Lab, source: str, label: str) -> tuple[list[float], list[str]]:
    """SESSIONS inbound messages one after another: their times and any failures."""
    times, failures = [], []
    for i in range(SESSIONS):
        started = time.monotonic()
        try:
            refused = send_mail(lab, source, lab.server.ipv4, EXTERNAL, INBOUND_TO,
                                f"inbound {label} {i}", timeout=SESSION_TIMEOUT)
        except (OSError, EOFError) as exc:
            refused = exc
        times.append(time.monotonic() - started)
        if refused is not None:
            failures.append(f"session {i}: {refused!r}")
    return times, failures


class Figures:
    """Inbound-session times per store state, printed as a table."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: dict[str, tuple[list[float], list[str], list[dict]]] = {}

    def measure(self, lab: Lab, label: str, inbound: str, flooders: list[str], workdir: Path,
                capsys: pytest.CaptureFixture) -> list[float]:
        with RelayFlood(lab, lab.server.ipv4, flooders, workdir / f"flood-{label}.jsonl") as flood:
            times, failures = timed_inbound(lab, inbound, label)
        self.rows[label] = (times, failures, flood.outcomes)
        with capsys.disabled():
            print(f"\n{self.title}, {label}: " + self.line(label), flush=True)
        return times

    def line(self, label: str) -> str:
        times, failures, outcomes = self.rows[label]
        counts = {k: sum(o["outcome"] == k for o in outcomes) for k in ("refused", "relayed", "error")}
        return (f"{len(times)} inbound sessions, p50 {percentile(times, 50):.3f} s, "
                f"p99 {percentile(times, 99):.3f} s, slowest {max(times):.3f} s, "
                f"{len(failures)} failed; relay attempts meanwhile: {counts['refused']} refused, "
                f"{counts['relayed']} relayed, {counts['error']} errors")

    def check(self, label: str) -> None:
        """Every inbound session delivered, every relay attempt refused."""
        times, failures, outcomes = self.rows[label]
        assert not failures, f"{label}: {failures}"
        relayed = [o for o in outcomes if o["outcome"] != "refused"]
        assert outcomes and not relayed, f"{label}: relay attempts not refused: {relayed}"


def login_kept_in_memory(lab, mail_server, gate, fresh) -> str:
    """A POP3 login while the store is out: the client may relay at once."""
    source = fresh()
    assert pop3_login(lab, mail_server, source, lab.server.ipv4) >= 0
    gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice")
    assert_relayed(lab, mail_server, source, lab.server.ipv4, LOCAL, external())
    return source


def test_redis_black_holed_killed_restarted(lab, mail_server, make_gate, fresh, lab_redis,
                                             tmp_path, capsys):
    gate = make_gate(state=lab_redis.url)
    server = lab.server.ipv4
    inbound = fresh()
    flooders = [fresh() for _ in range(FLOODERS)]
    figures = Figures("Redis")

    # Up: a login learned here reaches Redis.
    before = fresh()
    pop3_login(lab, mail_server, before, server)
    wait_until(lambda: lab_redis.has_login(before), 5, "the login in Redis")
    figures.measure(lab, "up", inbound, flooders, tmp_path, capsys)
    figures.check("up")

    # Black-holed: no session waits, no relay; a new login works from memory.
    lab_redis.black_hole()
    blocked = figures.measure(lab, "black-holed", inbound, flooders, tmp_path, capsys)
    assert max(blocked) < NO_STALL, f"an inbound session waited on the store: {max(blocked):.3f} s"
    figures.check("black-holed")
    gate.wait_for_log(r"ERROR login store redis://:\*\*\*@.* unavailable", timeout=RECOVERY_TIMEOUT)
    assert gate.control("status")["store"]["connected"] is False
    during_black_hole = login_kept_in_memory(lab, mail_server, gate, fresh)
    assert gate.control("status")["store"]["pending_writes"] == 1
    assert_relay_refused(lab, mail_server, gate, flooders[0], server, LOCAL, external())
    mark = len(gate.log_lines())
    lab_redis.restore()
    gate.wait_for_log(r"login store redis://:\*\*\*@.* is back", timeout=RECOVERY_TIMEOUT, after=mark)
    wait_until(lambda: lab_redis.has_login(during_black_hole), RECOVERY_TIMEOUT,
               "the login learned while Redis was black-holed to reach it")

    # Killed: the same, with the connection refused at once.
    lab_redis.kill()
    figures.measure(lab, "killed", inbound, flooders, tmp_path, capsys)
    figures.check("killed")
    gate.wait_for_log(r"ERROR login store .* unavailable", timeout=RECOVERY_TIMEOUT, after=mark)
    during_kill = login_kept_in_memory(lab, mail_server, gate, fresh)

    # Restarted: the append-only file kept what was written; the pending login is written.
    mark = len(gate.log_lines())
    lab_redis.start()
    gate.wait_for_log(r"login store .* is back", timeout=RECOVERY_TIMEOUT, after=mark)
    wait_until(lambda: lab_redis.has_login(during_kill), RECOVERY_TIMEOUT,
               "the login learned while Redis was down to reach it")
    assert lab_redis.has_login(before) and lab_redis.has_login(during_black_hole)
    store = gate.control("status")["store"]
    assert store["connected"] is True and store["pending_writes"] == 0, store
    figures.measure(lab, "restarted", inbound, flooders, tmp_path, capsys)
    figures.check("restarted")

    # A login another gateway writes into Redis is followed at once, a removal too.
    other = fresh()
    key = f"sapd-nfq:login:{other}"
    lab_redis.cli("HSET", key, "user", "bob", "source", "pop3", "expires", repr(time.time() + 600))
    lab_redis.cli("EXPIRE", key, "601")
    wait_until(lambda: try_rcpt(lab, other, server, LOCAL, external()) is None, 5,
               "a login written by another gateway to let its client relay")
    lab_redis.cli("DEL", key)
    wait_until(lambda: try_rcpt(lab, other, server, LOCAL, external()) is not None, 5,
               "the removal to be followed")
    assert_relay_refused(lab, mail_server, gate, other, server, LOCAL, external())
    assert LabRedis.PASSWORD not in gate.log()


# --- SQLite ----------------------------------------------------------------------------

@pytest.fixture
def small_disk(lab):
    """A 1 MiB tmpfs under the lab's state directory for the gate's state, to
    fill and to make read-only; unmounted after the test (and after its gate)."""
    mount = lab.state_dir / "store-disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "sapd-store", str(mount)],
                   check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)
        mount.rmdir()


def fill(disk: Path) -> None:
    subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"],
                   stderr=subprocess.DEVNULL, check=False)  # ends with ENOSPC


def store_status(gate) -> dict:
    return gate.control("status")["store"]


def assert_store_out_but_decisions_go_on(lab, mail_server, gate, fresh, error: str) -> str:
    """POP3 works and a new login relays from memory; the loss is logged with
    its cause; a client that never logged in is refused. Returns the new
    login's address."""
    learned = login_kept_in_memory(lab, mail_server, gate, fresh)
    gate.wait_for_log(rf"ERROR login store \S+ unavailable: .*{error}", timeout=RECOVERY_TIMEOUT)
    assert store_status(gate)["connected"] is False
    assert_relay_refused(lab, mail_server, gate, fresh(), lab.server.ipv4, LOCAL, external())
    return learned


def wait_until_written(gate, mark: int, address: str) -> None:
    gate.wait_for_log(r"login store \S+ is back after", timeout=RECOVERY_TIMEOUT, after=mark)
    wait_until(lambda: store_status(gate)["pending_writes"] == 0, RECOVERY_TIMEOUT, "the write")
    assert address in gate.cli("auth", "list").stdout


def test_sqlite_on_a_full_disk(lab, mail_server, small_disk, make_gate, fresh, capsys):
    gate = make_gate(state=str(small_disk / "logins.sqlite"))
    before = fresh()
    pop3_login(lab, mail_server, before, lab.server.ipv4)
    wait_until(lambda: before in gate.cli("auth", "list").stdout, 5, "the first login written")
    filled = time.monotonic()
    fill(small_disk)
    learned = assert_store_out_but_decisions_go_on(lab, mail_server, gate, fresh, "disk is full")
    assert_relayed(lab, mail_server, before, lab.server.ipv4, LOCAL, external())  # still in memory
    assert store_status(gate)["pending_writes"] == 1
    mark = len(gate.log_lines())
    freed = time.monotonic()
    (small_disk / "filler").unlink()
    wait_until_written(gate, mark, learned)
    with capsys.disabled():
        print(f"\nSQLite, full disk: full for {freed - filled:.1f} s, decisions from memory; the login "
              f"learned meanwhile written {time.monotonic() - freed:.1f} s after space returned")


def test_sqlite_read_only_at_start(lab, mail_server, small_disk, make_gate, fresh):
    gate = make_gate(state=str(small_disk / "logins.sqlite"))
    before = fresh()
    pop3_login(lab, mail_server, before, lab.server.ipv4)
    assert gate.stop() == 0  # the file is closed: a busy tmpfs cannot become read-only
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        gate.start()
        learned = assert_store_out_but_decisions_go_on(lab, mail_server, gate, fresh,
                                                       "Read-only file system")
    finally:
        mark = len(gate.log_lines())
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    # `ip netns exec` gave the daemon a copy of the mount, with a read-only flag of its own
    subprocess.run(["nsenter", "-t", str(gate.pid), "-m", "mount", "-o", "remount,bind,rw",
                    str(small_disk)], check=True)
    wait_until_written(gate, mark, learned)
    # the file's own logins count again once it can be read
    assert_relayed(lab, mail_server, before, lab.server.ipv4, LOCAL, external())


def test_sqlite_corrupt_file(lab, mail_server, make_gate, fresh):
    gate = make_gate()
    state = Path(gate.config.state)
    before = fresh()
    pop3_login(lab, mail_server, before, lab.server.ipv4)
    assert gate.stop() == 0  # closed: the journal is folded into the file
    with open(state, "r+b") as f:
        f.write(b"\xff" * 100)  # the header
    gate.start()
    learned = assert_store_out_but_decisions_go_on(lab, mail_server, gate, fresh,
                                                   "file is not a database")
    assert_relay_refused(lab, mail_server, gate, before, lab.server.ipv4, LOCAL, external())
    # The administrator's repair: the broken file moved aside, the daemon makes a new one.
    mark = len(gate.log_lines())
    state.rename(state.with_suffix(".corrupt"))
    wait_until_written(gate, mark, learned)
