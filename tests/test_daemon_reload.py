"""The daemon's file watch: when a changed virtusertable is read, and when a
table that loses local addresses is applied. No queue, no root: the daemon
is built with a store in memory and no raw sockets, and its watch is driven
with a clock of the test's own.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess

import pytest

from sapd_nfq.engine.verdicts import ACCEPT, ACCEPTED, BYPASS, Decision
from sapd_nfq.kernel import worker as worker_module
from sapd_nfq.kernel.worker import REMOVAL_SETTLE, Worker
from sapd_nfq.wiring.config import load_config
from sapd_nfq.wiring.filewatch import SETTLE_INTERVAL, FileWatch

HEAD = "postmaster@lab.example\talice\n@lab.example\terror:nouser User unknown\n"
TAIL = "alice@lab.example\talice\nbob@lab.example\tbob\n"
CAROL = "carol@lab.example\talice\n"


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "virtusertable"
    path.write_text(HEAD + TAIL)
    return path


@pytest.fixture
def daemon(tmp_path, table, monkeypatch):
    monkeypatch.setattr(worker_module, "Injector", lambda: None)  # raw sockets need root
    config = tmp_path / "sapd-nfq.toml"
    config.write_text(f'virtusertable = "{table}"\nstate = "memory"\nrun_dir = "{tmp_path / "run"}"\n')
    return Worker(load_config(config), config)


def local(daemon: Worker, *addresses: str) -> bool:
    return all(daemon.engine.policy.table.is_local(a) for a in addresses)


def rewrite(path, text: str) -> None:
    """Write in place, as a program that does not rename does (a new stamp each time)."""
    with open(path, "w") as f:
        f.write(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


# --- FileWatch ------------------------------------------------------------------

def test_unchanged_stamps_are_never_due():
    watch = FileWatch(("a",))
    assert watch.due(("a",), 0.0) is None
    assert watch.due(("a",), 100.0) is None


def test_a_change_is_due_once_it_has_held_still():
    watch = FileWatch(("a",))
    assert watch.due(("b",), 10.0) is None
    assert watch.due(("b",), 10.0 + SETTLE_INTERVAL / 2) is None
    assert watch.due(("b",), 10.0 + SETTLE_INTERVAL) == SETTLE_INTERVAL


def test_every_new_change_starts_the_wait_over():
    watch = FileWatch(("a",))
    watch.due(("b",), 0.0)
    assert watch.due(("c",), SETTLE_INTERVAL) is None
    assert watch.due(("c",), 2 * SETTLE_INTERVAL) == SETTLE_INTERVAL


def test_hold_lengthens_the_wait_of_the_pending_change_only():
    watch = FileWatch(("a",))
    watch.due(("b",), 0.0)
    watch.hold(30.0)
    assert watch.due(("b",), 29.0) is None
    assert watch.due(("b",), 30.0) == 30.0
    watch.due(("c",), 31.0)  # a new change waits the ordinary time again
    assert watch.due(("c",), 31.0 + SETTLE_INTERVAL) == SETTLE_INTERVAL


def test_back_to_what_was_read_is_not_a_change():
    watch = FileWatch(("a",))
    watch.due(("b",), 0.0)
    assert watch.due(("a",), 1.0) is None
    assert watch.due(("b",), 2.0) is None  # seen anew: waits from here


# --- the daemon's reload --------------------------------------------------------

def test_an_added_address_takes_effect_once_the_file_holds_still(daemon, table):
    table.write_text(HEAD + TAIL + CAROL)
    daemon.watch(100.0)
    assert not local(daemon, "carol@lab.example")
    daemon.watch(100.0 + SETTLE_INTERVAL)
    assert local(daemon, "carol@lab.example", "alice@lab.example")
    assert daemon.reloads == 1


def test_a_half_written_table_never_takes_local_addresses_away(daemon, table):
    # The writer stops after the first half for longer than the settle interval:
    # what it left is a well-formed table without alice and bob.
    rewrite(table, HEAD)
    for t in (100.0, 100.0 + SETTLE_INTERVAL, 100.0 + REMOVAL_SETTLE / 2):
        daemon.watch(t)
        assert local(daemon, "alice@lab.example", "bob@lab.example")
    rewrite(table, HEAD + TAIL + CAROL)
    later = 100.0 + REMOVAL_SETTLE / 2 + 1
    daemon.watch(later)
    daemon.watch(later + SETTLE_INTERVAL)
    assert local(daemon, "alice@lab.example", "bob@lab.example", "carol@lab.example")
    assert daemon.reloads == 1


def test_a_removal_takes_effect_once_the_file_has_held_still_long(daemon, table):
    table.write_text(HEAD + "alice@lab.example\talice\n")
    daemon.watch(100.0)
    daemon.watch(100.0 + SETTLE_INTERVAL)
    daemon.watch(100.0 + REMOVAL_SETTLE - 1)
    assert local(daemon, "bob@lab.example") and daemon.reloads == 0
    daemon.watch(100.0 + REMOVAL_SETTLE)
    assert not local(daemon, "bob@lab.example") and local(daemon, "alice@lab.example")
    assert daemon.reloads == 1
    daemon.watch(200.0)  # read once: nothing more to do
    assert daemon.reloads == 1


def test_a_requested_reload_applies_a_removal_at_once(daemon, table):
    table.write_text(HEAD + "alice@lab.example\talice\n")
    assert daemon.reload("SIGHUP")["ok"]
    assert not local(daemon, "bob@lab.example")
    daemon.watch(100.0)
    daemon.watch(100.0 + REMOVAL_SETTLE)  # the watch has nothing left to read
    assert daemon.reloads == 1


def test_a_broken_table_is_read_once_and_kept_out(daemon, table):
    table.write_text(HEAD + TAIL + "carol@lab.example\n")  # a key without a value
    daemon.watch(100.0)
    daemon.watch(100.0 + SETTLE_INTERVAL)
    assert "has no value" in daemon.last_reload_error
    daemon.last_reload_error = None
    daemon.watch(100.0 + 2 * SETTLE_INTERVAL)
    assert daemon.last_reload_error is None  # not retried until the file changes again
    assert local(daemon, "alice@lab.example", "bob@lab.example") and daemon.reloads == 0


# --- monitor mode: the switch in the worker, and a reload that flips it ------------

class Packet:
    """What the worker calls on a queued packet, recorded."""

    def __init__(self, payload: bytes, calls: list[str] | None = None) -> None:
        self.payload, self.indev, self.physindev, self.id = payload, 0, 0, 1
        self.calls = [] if calls is None else calls

    def get_payload(self) -> bytes:
        return self.payload

    def get_mark(self) -> int:
        return 0

    def __getattr__(self, name):  # accept, drop, repeat, set_payload, set_mark
        return lambda *args: self.calls.append(name)


class Reader:
    """The queue socket's verdicts, recorded in the packets' own list."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def accept_later(self, packet_id: int) -> None:
        self.calls.append("accept later")

    def flush(self) -> None:
        self.calls.append("flush")


def write_config(daemon: Worker, extra: str) -> None:
    text = daemon.config_path.read_text().split("enforce")[0]
    rewrite(daemon.config_path, text + extra)


def test_an_engine_failure_drops_when_enforcing_and_passes_in_monitor_mode(daemon, monkeypatch):
    class Broken:
        """In the engine's place: a compiled engine's methods cannot be patched."""

        def handle(self, *args, **kwargs):
            raise RuntimeError("a bug")

    monkeypatch.setattr(daemon, "engine", Broken())
    enforcing = Packet(b"x")
    daemon.reader = Reader(enforcing.calls)
    daemon.on_packet(enforcing)
    daemon.config = daemon.engine.config = dataclasses.replace(daemon.config, enforce=False)
    watching = Packet(b"x")
    daemon.reader = Reader(watching.calls)
    daemon.on_packet(watching)
    # the accepts before a drop leave first; a plain accept waits for the batch verdict
    assert enforcing.calls == ["flush", "drop"] and watching.calls == ["accept later"]
    assert daemon.stats.counted["engine_errors"] == 2
    assert daemon.stats.would_refuse == {"engine_error": 1}


def test_a_reload_switches_the_mode_and_the_installed_smtp_rule(daemon):
    commands = []

    def runner(argv, stdin=None):
        commands.append((argv[0], stdin))
        saved = "*mangle\n:SAPD_NFQ_SMTP - [0:0]\nCOMMIT\n" if argv[0] == "iptables-save" else ""
        return subprocess.CompletedProcess(argv, 0, saved, "")

    daemon.rules_runner = runner
    write_config(daemon, "enforce = false\n")
    assert daemon.reload("test")["ok"] and not daemon.config.enforce and not daemon.engine.config.enforce
    [(_, restored)] = [c for c in commands if c[0] == "iptables-restore"]  # IPv6 has no rules here
    assert "-A SAPD_NFQ_SMTP -j NFQUEUE --queue-num 0 --queue-bypass" in restored
    assert daemon.status().enforce is False
    commands.clear()
    write_config(daemon, "enforce = true\n")
    assert daemon.reload("test")["ok"] and daemon.config.enforce
    [(_, restored)] = [c for c in commands if c[0] == "iptables-restore"]
    assert "-A SAPD_NFQ_SMTP -j NFQUEUE --queue-num 0\n" in restored


def test_a_switch_the_rules_cannot_follow_keeps_the_running_mode(daemon):
    def runner(argv, stdin=None):
        return subprocess.CompletedProcess(argv, 1, "", "iptables: no such table")

    daemon.rules_runner = runner
    write_config(daemon, "enforce = false\n")
    answer = daemon.reload("test")
    assert not answer["ok"] and "no such table" in answer["error"]
    assert daemon.config.enforce and daemon.engine.config.enforce


def test_only_plain_accepts_wait_for_the_batch_verdict(daemon, monkeypatch):
    decisions = iter([ACCEPTED, Decision(ACCEPT, packet=b"rewritten"), Decision(BYPASS)])

    class Deciding:
        """In the engine's place (a compiled engine's methods cannot be patched)."""

        def handle(self, *args, **kwargs):
            return next(decisions)

    monkeypatch.setattr(daemon, "engine", Deciding())
    calls: list[str] = []
    daemon.reader = Reader(calls)
    for _ in range(3):
        daemon.on_packet(Packet(b"x", calls))
    assert calls == ["accept later",
                     "flush", "set_payload", "accept",
                     "flush", "set_mark", "repeat"]
