import os
import sqlite3
import stat
import subprocess
import sys
import time

import pytest

from sapd_nfq.engine.logins import EXACT, Login, LoginScope, MemoryLoginStore, StoreError
from sapd_nfq.logins import open_store, store_kind
from sapd_nfq.logins.sqlite_store import SQLiteLoginStore

NOW = 1_700_000_000.0
TTL = 1800


def _redis_store(url, scope=EXACT):
    from sapd_nfq.logins.redis_store import RedisLoginStore

    s = RedisLoginStore(url, scope)
    s._redis.flushdb()
    return s


def _open(kind, request, tmp_path, scope=EXACT):
    if kind == "memory":
        return MemoryLoginStore(scope)
    if kind == "sqlite":
        return SQLiteLoginStore(tmp_path / "l.sqlite", scope=scope)
    return _redis_store(request.getfixturevalue("redis_url"), scope)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    s = _open(request.param, request, tmp_path)
    yield s
    s.close()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def by_network(request, tmp_path):
    """A store whose logins open /24 (IPv4) and /64 (IPv6)."""
    s = _open(request.param, request, tmp_path, LoginScope(24, 64))
    yield s
    s.close()


# --- behaviour every backend shares ---------------------------------------------------

def test_add_then_logged_in_until_expiry(store):
    login = store.add("198.18.0.5", "alice", NOW, TTL)
    assert login == Login("198.18.0.5", "alice", NOW + TTL, "pop3")
    assert store.get("198.18.0.5", NOW) == login
    assert store.is_logged_in("198.18.0.5", NOW + TTL - 1)
    assert not store.is_logged_in("198.18.0.5", NOW + TTL)  # expires is exclusive
    assert not store.is_logged_in("198.18.0.6", NOW)


@pytest.mark.parametrize(("added", "asked", "key"), [
    ("::ffff:198.18.0.5", "198.18.0.5", "198.18.0.5"),
    ("198.18.0.5", "::ffff:198.18.0.5", "198.18.0.5"),
    ("2001:DB8:0:0::0:5", "2001:db8::5", "2001:db8::5"),
    ("[2001:db8::5]", "IPv6:2001:db8::5", "2001:db8::5"),
    ("fe80::1%eth0", "fe80::1", "fe80::1"),
])
def test_addresses_are_normalised(store, added, asked, key):
    assert store.add(added, None, NOW, TTL).address == key
    assert store.is_logged_in(asked, NOW)
    assert [x.address for x in store.entries(NOW)] == [key]


def test_a_new_login_replaces_user_and_source_but_never_shortens(store):
    store.add("198.18.0.5", "admin-set", NOW, 86400, source="manual")
    login = store.add("198.18.0.5", "alice", NOW + 10, TTL, source="pop3")
    assert login == Login("198.18.0.5", "alice", NOW + 86400, "pop3")
    assert store.get("198.18.0.5", NOW + 20) == login
    later = store.add("198.18.0.5", "bob", NOW + 86400, TTL, source="smtp-auth")
    assert later.expires == NOW + 86400 + TTL
    assert len(store.entries(NOW + 86400)) == 1


def test_an_expired_entry_is_renewed_by_a_new_login(store):
    store.add("198.18.0.5", "alice", NOW, TTL)
    assert store.add("198.18.0.5", "alice", NOW + 5000, TTL).expires == NOW + 5000 + TTL


def test_remove(store):
    store.add("198.18.0.5", "alice", NOW, TTL)
    assert store.remove("::ffff:198.18.0.5")
    assert not store.is_logged_in("198.18.0.5", NOW)
    assert not store.remove("198.18.0.5")


def test_entries_hide_expired_and_sort_by_address(store):
    store.add("198.18.0.10", "a", NOW, TTL)
    store.add("2001:db8::1", "b", NOW, TTL)
    store.add("198.18.0.9", "c", NOW, TTL, source="manual")
    store.add("198.18.0.1", "old", NOW - 2 * TTL, TTL)
    assert [x.address for x in store.entries(NOW)] == ["198.18.0.9", "198.18.0.10", "2001:db8::1"]


def test_purge_deletes_only_expired(store):
    store.add("198.18.0.1", "old", NOW - 2 * TTL, TTL)
    store.add("198.18.0.2", "old", NOW - TTL, TTL)   # expires exactly now
    store.add("198.18.0.3", "new", NOW, TTL)
    assert store.purge(NOW) == 2
    assert store.purge(NOW) == 0
    assert [x.address for x in store.entries(NOW)] == ["198.18.0.3"]
    assert not store.remove("198.18.0.1")


@pytest.mark.parametrize("address", ["", "alice", "198.18.0.256", "010.1.1.1", "2001:db8::g"])
def test_bad_addresses_raise_value_error(store, address):
    with pytest.raises(ValueError):
        store.add(address, None, NOW, TTL)
    with pytest.raises(ValueError):
        store.is_logged_in(address, NOW)


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), float("nan")])
def test_bad_ttl(store, ttl):
    with pytest.raises(ValueError):
        store.add("198.18.0.5", None, NOW, ttl)


def test_context_manager_closes(tmp_path):
    with SQLiteLoginStore(tmp_path / "l.sqlite") as s:
        s.add("198.18.0.5", None, NOW, TTL)
    with pytest.raises(StoreError):
        s.is_logged_in("198.18.0.5", NOW)


# --- SQLite: persistence, sharing, files ---------------------------------------------

def test_sqlite_survives_reopen(tmp_path):
    path = tmp_path / "l.sqlite"
    with SQLiteLoginStore(path) as s:
        s.add("2001:db8::5", "alice", NOW, TTL, source="smtp-auth")
    with SQLiteLoginStore(path) as s:
        assert s.entries(NOW) == [Login("2001:db8::5", "alice", NOW + TTL, "smtp-auth")]


def test_sqlite_second_connection_sees_every_write_at_once(tmp_path):
    path = tmp_path / "l.sqlite"
    with SQLiteLoginStore(path) as daemon, SQLiteLoginStore(path) as cli:
        assert not daemon.is_logged_in("198.18.0.5", NOW)   # daemon has read before
        cli.add("198.18.0.5", None, NOW, TTL, source="manual")
        assert daemon.is_logged_in("198.18.0.5", NOW)
        daemon.add("198.18.0.6", "bob", NOW, TTL)
        assert [x.address for x in cli.entries(NOW)] == ["198.18.0.5", "198.18.0.6"]
        assert cli.remove("198.18.0.6")
        assert not daemon.is_logged_in("198.18.0.6", NOW)


def test_sqlite_another_process_writes_while_open(tmp_path):
    path = tmp_path / "l.sqlite"
    with SQLiteLoginStore(path) as daemon:
        assert daemon.entries(NOW) == []
        script = ("import sys; from sapd_nfq.logins.sqlite_store import SQLiteLoginStore as S; "
                  "s = S(sys.argv[1]); s.add('198.18.0.7', None, float(sys.argv[2]), 60, "
                  "source='manual'); s.close()")
        subprocess.run([sys.executable, "-c", script, str(path), str(NOW)], check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert daemon.get("198.18.0.7", NOW) == Login("198.18.0.7", None, NOW + 60, "manual")


def test_sqlite_files_and_settings(tmp_path):
    path = tmp_path / "new" / "dir" / "l.sqlite"
    with SQLiteLoginStore(path, busy_timeout=2.5) as s:
        s.add("198.18.0.5", None, NOW, TTL)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(f"{path}-wal").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        db = s._db
        assert db.execute("PRAGMA journal_mode").fetchall() == [("wal",)]
        assert db.execute("PRAGMA busy_timeout").fetchall() == [(2500,)]


def test_sqlite_existing_file_keeps_its_mode(tmp_path):
    path = tmp_path / "l.sqlite"
    path.touch(mode=0o640)
    os.chmod(path, 0o640)
    SQLiteLoginStore(path).close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_sqlite_busy_writer_fails_cleanly(tmp_path):
    path = tmp_path / "l.sqlite"
    with SQLiteLoginStore(path) as s:
        s.add("198.18.0.5", "alice", NOW, TTL)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        s._db.execute("PRAGMA busy_timeout = 0")
        with pytest.raises(StoreError, match="cannot add login"):
            s.add("198.18.0.6", "bob", NOW, TTL)
        blocker.execute("ROLLBACK")
        blocker.close()
        assert [x.address for x in s.entries(NOW)] == ["198.18.0.5"]
        assert not s._db.in_transaction


def test_sqlite_failed_write_leaves_the_old_entry(tmp_path):
    path = tmp_path / "l.sqlite"
    with SQLiteLoginStore(path) as s:
        before = s.add("198.18.0.5", "alice", NOW, TTL)
        s._db.execute("CREATE TEMP TRIGGER boom BEFORE INSERT ON main.logins "
                      "WHEN NEW.user = 'mallory' BEGIN SELECT RAISE(ABORT, 'boom'); END")
        with pytest.raises(StoreError, match="boom"):
            s.add("198.18.0.5", "mallory", NOW + 10, TTL)
        assert not s._db.in_transaction
        assert s.get("198.18.0.5", NOW) == before


@pytest.mark.parametrize("content", [b"this is not a database, just some text" * 50])
def test_sqlite_not_a_database(tmp_path, content):
    path = tmp_path / "l.sqlite"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="cannot open login store"):
        SQLiteLoginStore(path)


def test_sqlite_path_is_a_directory(tmp_path):
    with pytest.raises(StoreError, match="cannot open login store"):
        SQLiteLoginStore(tmp_path)


def test_sqlite_newer_schema_is_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(StoreError, match="schema version 99"):
        SQLiteLoginStore(path)


# --- open_store ------------------------------------------------------------------------

def test_open_store(tmp_path):
    with open_store("memory") as s:
        assert isinstance(s, MemoryLoginStore)
    with open_store(str(tmp_path / "l.sqlite")) as s:
        assert isinstance(s, SQLiteLoginStore)


@pytest.mark.parametrize("spec", ["", "  ", "ftp://localhost/0", "a\0b"])
def test_open_store_refuses_unknown_specs(spec):
    with pytest.raises(StoreError, match='expected "memory", a file path or a redis:// URL'):
        open_store(spec)
    with pytest.raises(ValueError):
        store_kind(spec)


# --- Redis: a table shared by several gateways ---------------------------------------

def test_two_gateways_share_one_redis_table(redis_url):
    with _redis_store(redis_url) as gw1, open_store(redis_url) as gw2:
        gw1.add("198.18.0.5", "alice", NOW, TTL)
        assert gw2.is_logged_in("198.18.0.5", NOW)
        assert gw2.remove("198.18.0.5")
        assert not gw1.is_logged_in("198.18.0.5", NOW)


def test_redis_drops_the_key_when_the_window_closes(redis_url):
    with _redis_store(redis_url) as s:
        now = time.time()
        s.add("198.18.0.5", None, now, 1)
        ttl = s._redis.ttl("sapd-nfq:login:198.18.0.5")
        assert 0 < ttl <= 2


def test_redis_password_never_shown(redis_url):
    from sapd_nfq.logins.redis_store import RedisLoginStore, redacted

    assert redacted("redis://:s3cret@198.18.0.9:6379/0") == "redis://:***@198.18.0.9:6379/0"
    with pytest.raises(StoreError) as e:
        RedisLoginStore("unix://:s3cret@/nonexistent/redis.sock")
    assert "s3cret" not in str(e.value)
    with _redis_store(redis_url) as s:
        assert "s3cret" not in repr(s)


def test_open_store_picks_redis_for_redis_urls():
    assert store_kind("redis://:pw@198.18.0.9:6379/0") == "redis"
    assert store_kind("rediss://198.18.0.9/1") == "redis"
    assert store_kind("unix:///run/redis/redis.sock") == "redis"


def test_redis_reads_a_table_larger_than_one_batch(redis_url):
    with _redis_store(redis_url) as s:
        pipe = s._redis.pipeline()
        for i in range(1200):
            pipe.hset(f"sapd-nfq:login:198.18.{i // 250}.{i % 250}",
                      mapping={"user": "", "source": "pop3", "expires": repr(NOW + TTL)})
        pipe.execute()
        assert len(s.entries(NOW)) == 1200


# --- logins by network ------------------------------------------------------------------

def test_a_login_opens_its_network_wherever_it_is_used(by_network):
    login = by_network.add("2001:db8:1:2::a", "alice", NOW, TTL)
    assert login.address == "2001:db8:1:2::/64"
    assert by_network.get("2001:db8:1:2:ffff::b", NOW) == login   # another privacy address
    assert not by_network.is_logged_in("2001:db8:1:3::a", NOW)   # another /64
    assert by_network.add("198.18.7.9", None, NOW, TTL).address == "198.18.7.0/24"
    assert by_network.is_logged_in("::ffff:198.18.7.200", NOW)
    assert not by_network.is_logged_in("198.18.8.9", NOW)
    assert [x.address for x in by_network.entries(NOW)] == ["198.18.7.0/24", "2001:db8:1:2::/64"]
    # one entry per network: a second address renews it
    assert by_network.add("2001:db8:1:2::c", "bob", NOW + 10, TTL).expires == NOW + 10 + TTL
    assert len(by_network.entries(NOW)) == 2
    assert by_network.remove("2001:db8:1:2::dead")
    assert not by_network.is_logged_in("2001:db8:1:2::a", NOW)
    assert by_network.purge(NOW + TTL) == 1 and by_network.entries(NOW) == []


def test_a_key_is_its_own_key():
    # the replica writes and reads its backend by key
    scope = LoginScope(24, 64)
    for address in ("2001:db8:1:2::a", "198.18.7.9"):
        assert scope.key(scope.key(address)) == scope.key(address)
    assert LoginScope(32, 128).key("2001:db8::5") == "2001:db8::5"


def test_prefixes_out_of_range_are_refused():
    with pytest.raises(ValueError):
        LoginScope(33, 64)
    with pytest.raises(ValueError):
        LoginScope(32, 129)
