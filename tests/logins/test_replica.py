"""The daemon's replica of a login store, against real backends: a
redis-server of the test's own (killed, paused with SIGSTOP, restarted) and
SQLite files written by a second connection, as the CLI writes them.

Times asserted are bounds on a property, not speeds: a call that does no I/O
takes microseconds (a few ms on a machine loaded to 2.5 times its CPUs), one
that waits on a stopped Redis takes its 2 s timeout, and NO_WAIT sits far
between the two so that a busy machine passes.
"""

from __future__ import annotations

import logging
import time

import pytest

from sapd_nfq.engine.logins import EXACT, Login, LoginScope
from sapd_nfq.logins import backend
from sapd_nfq.logins.replica import WAIT, ReplicaLoginStore
from sapd_nfq.logins.sqlite_store import SQLiteLoginStore

TTL = 600
NO_WAIT = 0.2  # seconds: far above a memory lookup, a tenth of the store's timeout
SEEN = 5.0  # seconds for a change to travel; events arrive in milliseconds
RECOVERED = 20.0  # seconds for a store that came back to be noticed (backoff is 5 s at most)
LOG = "sapd-nfq.test-replica"


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return result


@pytest.fixture
def make_replica():
    replicas: list[ReplicaLoginStore] = []

    def make(spec: str, **kw) -> ReplicaLoginStore:
        found = backend(spec, kw.get("scope", EXACT))
        replica = ReplicaLoginStore(found.open, found.name, logging.getLogger(LOG), **kw)
        replica.start()
        replicas.append(replica)
        return replica

    yield make
    for replica in replicas:
        replica.close()


def writer(spec: str):
    """Another gateway, or the CLI: the backend itself."""
    return backend(spec).open()


def held(replica: ReplicaLoginStore) -> set[str]:
    """Every address memory holds, expired or not."""
    return {x.address for x in replica.entries(0.0)}


def timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


# --- Redis --------------------------------------------------------------------------

def test_another_writers_add_and_remove_arrive_by_notification(redis_server, make_replica):
    redis_server.start()
    replica = make_replica(redis_server.url)
    assert replica.stats()["mode"] == "following keyspace notifications"
    now = time.time()
    with writer(redis_server.url) as other:
        added = other.add("198.18.0.5", "alice", now, TTL)
        assert wait_until(lambda: replica.get("198.18.0.5", now), SEEN, "the add") == added
        other.remove("198.18.0.5")
        wait_until(lambda: "198.18.0.5" not in held(replica), SEEN, "the removal")
        other.add("198.18.0.6", "bob", now, 1)  # Redis expires the key itself
        wait_until(lambda: "198.18.0.6" in held(replica), SEEN, "the short login")
        wait_until(lambda: "198.18.0.6" not in held(replica), SEEN, "the key's expiry")


def test_local_logins_are_written(redis_server, make_replica):
    redis_server.start()
    replica = make_replica(redis_server.url)
    now = time.time()
    login = replica.add("2001:db8::5", "alice", now, TTL)
    assert replica.get("2001:db8::5", now) == login  # at once, from memory
    with writer(redis_server.url) as other:
        stored = wait_until(lambda: other.get("2001:db8::5", now), SEEN, "the write")
        assert (stored.user, stored.source) == ("alice", "pop3")
        assert stored.expires == pytest.approx(login.expires)
        replica.remove("2001:db8::5")
        wait_until(lambda: other.get("2001:db8::5", now) is None, SEEN, "the removal")
    wait_until(lambda: replica.stats()["pending_writes"] == 0, SEEN, "the queue to empty")


def test_a_restarted_redis_is_read_again(redis_server, make_replica, caplog):
    caplog.set_level(logging.INFO, LOG)
    redis_server.start()
    replica = make_replica(redis_server.url)
    now = time.time()
    with writer(redis_server.url) as other:
        other.add("198.18.0.5", "alice", now, TTL)
    wait_until(lambda: replica.get("198.18.0.5", now), SEEN, "the first login")
    redis_server.kill()
    wait_until(lambda: not replica.stats()["connected"], SEEN, "the loss to be noticed")
    assert replica.get("198.18.0.5", now) is not None  # kept while Redis is away
    redis_server.start()  # empty: it saved nothing
    with writer(redis_server.url) as other:
        other.add("198.18.0.7", "bob", now, TTL)
    wait_until(lambda: held(replica) == {"198.18.0.7"}, RECOVERED, "the reload")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(" unavailable: " in m for m in messages) == 1, messages  # once, not per retry
    assert sum(" is back after " in m for m in messages) == 1, messages


def test_writes_made_while_redis_is_down_are_written_when_it_returns(redis_server, make_replica):
    redis_server.start()
    replica = make_replica(redis_server.url)
    redis_server.kill()
    wait_until(lambda: not replica.stats()["connected"], SEEN, "the loss to be noticed")
    now = time.time()
    replica.add("198.18.0.5", "alice", now, TTL)
    replica.add("198.18.0.6", "bob", now, TTL)
    replica.remove("198.18.0.6")
    assert replica.stats()["pending_writes"] == 2
    redis_server.start()
    deadline = time.monotonic() + RECOVERED
    while replica.stats()["pending_writes"]:
        # never lost from memory while the reconnecting replica reloads the table
        assert replica.is_logged_in("198.18.0.5", now)
        assert time.monotonic() < deadline, "the pending writes were not written"
        time.sleep(0.005)
    assert replica.stats()["connected"]
    with writer(redis_server.url) as other:
        assert other.get("198.18.0.5", now).user == "alice"
        assert other.get("198.18.0.6", now) is None


@pytest.mark.parametrize("fault", ["kill", "pause"])
def test_no_call_waits_on_a_dead_or_frozen_redis(redis_server, make_replica, fault):
    redis_server.start()
    replica = make_replica(redis_server.url)
    now = time.time()
    replica.add("198.18.0.5", "alice", now, TTL)
    wait_until(lambda: not replica.stats()["pending_writes"], SEEN, "the first write")
    getattr(redis_server, fault)()
    slowest = 0.0
    # past the store's 2 s timeout, with the thread stuck in a write most of the time
    deadline = time.monotonic() + 3.0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        address = f"198.18.1.{i % 250}"
        slowest = max(slowest,
                      timed(replica.get, "198.18.0.5", now),
                      timed(replica.is_logged_in, "198.18.0.9", now),
                      timed(replica.add, address, None, now, TTL))
        time.sleep(0.001)
    assert slowest < NO_WAIT, f"a call took {slowest:.3f} s"
    assert replica.is_logged_in("198.18.0.5", now) and not replica.is_logged_in("198.18.0.9", now)
    if fault == "pause":
        redis_server.resume()


def test_reads_the_whole_table_where_config_is_refused(redis_server, make_replica, monkeypatch):
    from sapd_nfq.logins import redis_store

    monkeypatch.setattr(redis_store, "POLL_INTERVAL", 0.5)
    redis_server.args = ("--user", "gate", "on", ">pw", "~*", "&*", "+@all", "-config",
                         "--user", "default", "off")
    redis_server.start()
    url = f"unix://gate:pw@{redis_server.sock}"
    replica = make_replica(url)
    assert replica.stats()["mode"].startswith("keyspace notifications refused (")
    now = time.time()
    with writer(url) as other:
        other.add("198.18.0.5", "alice", now, TTL)
        wait_until(lambda: replica.get("198.18.0.5", now), SEEN, "the next full read")


# --- SQLite ---------------------------------------------------------------------------

def test_sqlite_cli_writes_are_seen_within_a_look(tmp_path, make_replica):
    path = str(tmp_path / "l.sqlite")
    replica = make_replica(path)
    now = time.time()
    with SQLiteLoginStore(path) as cli:
        started = time.monotonic()
        cli.add("198.18.0.5", None, now, TTL, source="manual")
        wait_until(lambda: replica.get("198.18.0.5", now), SEEN, "the CLI's add")
        assert time.monotonic() - started < WAIT + 1.0  # one look, and a busy machine
        cli.remove("198.18.0.5")
        wait_until(lambda: not replica.is_logged_in("198.18.0.5", now), SEEN, "the CLI's del")
        replica.add("198.18.0.6", "bob", now, TTL)
        wait_until(lambda: cli.get("198.18.0.6", now), SEEN, "the replica's write")


def test_sqlite_a_reload_can_be_asked_for(tmp_path, make_replica):
    path = str(tmp_path / "l.sqlite")
    replica = make_replica(path)
    now = time.time()
    with SQLiteLoginStore(path) as cli:
        cli.add("198.18.0.5", None, now, TTL, source="manual")
    ticket = replica.request_reload()
    wait_until(lambda: replica.stats()["reloaded"] >= ticket, SEEN, "the reload")
    assert replica.is_logged_in("198.18.0.5", now)


def test_sqlite_close_writes_what_is_pending(tmp_path):
    path = str(tmp_path / "l.sqlite")
    found = backend(path)
    replica = ReplicaLoginStore(found.open, found.name, logging.getLogger(LOG))
    replica.start()
    now = time.time()
    login = replica.add("198.18.0.5", "alice", now, TTL)
    replica.close()
    with SQLiteLoginStore(path) as cli:
        assert cli.get("198.18.0.5", now) == login


def test_sqlite_a_corrupt_file_leaves_memory_working(tmp_path, make_replica, caplog):
    caplog.set_level(logging.INFO, LOG)
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"not a database " * 100)
    replica = make_replica(str(path))
    assert not replica.stats()["connected"]
    assert "file is not a database" in replica.stats()["last_error"]
    assert any("unavailable" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    now = time.time()
    assert not replica.is_logged_in("198.18.0.5", now)  # nothing invented
    replica.add("198.18.0.5", "alice", now, TTL)
    assert replica.is_logged_in("198.18.0.5", now)
    path.unlink()  # the administrator's repair: a fresh file
    wait_until(lambda: replica.stats()["connected"] and not replica.stats()["pending_writes"],
               RECOVERED, "the new file")
    with SQLiteLoginStore(path) as cli:
        assert cli.get("198.18.0.5", now).user == "alice"


# --- the queue of writes --------------------------------------------------------------

def test_pending_writes_are_bounded_and_a_newer_change_replaces_an_older(tmp_path, make_replica):
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"not a database " * 100)  # the store stays out
    replica = make_replica(str(path), max_pending=2)
    now = time.time()
    replica.add("198.18.0.5", "alice", now, TTL)
    replica.add("198.18.0.5", "alice", now + 1, TTL)  # replaces, no drop
    replica.add("198.18.0.6", "bob", now, TTL)
    assert (replica.stats()["pending_writes"], replica.stats()["dropped_writes"]) == (2, 0)
    replica.remove("198.18.0.7")
    assert (replica.stats()["pending_writes"], replica.stats()["dropped_writes"]) == (2, 1)
    # memory still answers for every login learned, written or not
    assert replica.get("198.18.0.5", now) == Login("198.18.0.5", "alice", now + 1 + TTL, "pop3")
    assert replica.is_logged_in("198.18.0.6", now)


def test_the_replica_and_its_backend_key_logins_by_network(make_replica, tmp_path):
    spec = str(tmp_path / "l.sqlite")
    scope = LoginScope(32, 64)
    replica = make_replica(spec, scope=scope)
    replica.add("2001:db8:1:2::a", "alice", time.time(), 600)
    other = backend(spec, scope).open()
    wait_until(lambda: other.is_logged_in("2001:db8:1:2::b", time.time()), 5.0, "the write")
    other.add("2001:db8:9:9::1", "bob", time.time(), 600)
    wait_until(lambda: replica.is_logged_in("2001:db8:9:9::2", time.time()), 5.0, "the read")
    assert held(replica) == {"2001:db8:1:2::/64", "2001:db8:9:9::/64"}
    other.close()
