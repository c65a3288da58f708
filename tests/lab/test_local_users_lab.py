"""Local users get nothing: a shell user on the gateway cannot make, end or
read a login, reload the daemon, or read the config's Redis password.

A live daemon runs on gw (mode "forward"). Every attempt is made twice with
the same interpreter and the same command: as nobody (setpriv, no
supplementary groups), where it must be refused with a clear error, a
non-zero exit and no traceback, and as root, where it must work. The root
half shows the attempt is a real one, so that the refusal is the protection
at work and not a broken command. Writing a login into the SQLite file is
judged by the relay itself: a RCPT to an external address from that client.

The gate's files live under the lab's state directory (/run/PREFIX-lab,
0755), not under tmp_path: pytest's base directory is root's alone, so
nobody would be stopped there before reaching any of them and the test
would prove nothing. For the same reason the commands run from a copy of
the package in that directory, never from the clone: a clone in root's
home (0700) is out of nobody's reach.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from lab_gate import (
    CLI_TIMEOUT,
    LOCAL,
    REPO,
    Gate,
    external,
    mangle_rules,
    relay_denied,
    try_rcpt,
    wait_until,
)

pytestmark = pytest.mark.lab

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
USERS = [pytest.param("nobody", id="nobody"), pytest.param("root", id="root-can")]
SECRET = "s3cret-of-the-lab"

CONNECT = """\
import json, socket, sys
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(sys.argv[1])
    sock.sendall(b'{"command": "status"}\\n')
    sock.shutdown(socket.SHUT_WR)
    reply = json.loads(sock.makefile("rb").read())
print(json.dumps(reply))
sys.exit(0 if reply.get("ok") else 1)
"""
SQL = """\
import sqlite3, sys, time
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=rw", uri=True, isolation_level=None)
if sys.argv[2] == "write":
    db.execute("INSERT OR REPLACE INTO logins VALUES (?, 'mallory', ?, 'pop3')", (sys.argv[3], time.time() + 1800))
else:
    print(db.execute("SELECT * FROM logins").fetchall())
"""


def relay_refused(lab, client: str) -> bool:
    """Whether a RCPT to an external address from `client` is refused by the gate."""
    return relay_denied(str(try_rcpt(lab, client, lab.server.ipv4, LOCAL, external())))


def wait_relays(lab, client: str) -> None:
    wait_until(lambda: try_rcpt(lab, client, lab.server.ipv4, LOCAL, external()) is None,
               10, f"a relay from {client}", interval=0.5)


@pytest.fixture(scope="module")
def env(lab):
    """The environment both users run in, nothing taken from the caller's: its
    PYTHONPATH is a copy of the package and its libraries that everyone may
    read, wherever the clone and its virtualenv live."""
    copy = lab.state_dir / "local-users-package"
    # the package, and the pure-Python libraries its commands load (status reads the
    # host's links through pyroute2): the system's python3 may have none of them
    sources = [REPO / "sapd_nfq", *(Path(importlib.import_module(name).__file__).parent
                                     for name in ("pyroute2", "redis", "prometheus_client"))]
    for source in sources:
        shutil.copytree(source, copy / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path in (copy, *copy.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(copy), "HOME": "/nonexistent"}
    shutil.rmtree(copy)


@pytest.fixture(scope="module")
def python(lab, env):
    """An interpreter nobody may run: this one, or else the system's python3
    (the commands used here need nothing from the virtualenv). Probed by a
    shell that nobody runs: setpriv itself resolves the path it executes
    before its capabilities are gone, so it can start what nobody cannot
    reach (a python under /root, which then misses its own library)."""
    for candidate in (sys.executable, shutil.which("python3", path="/usr/bin:/bin")):
        probe = [*NOBODY, "sh", "-c", 'exec "$0" -c "import sapd_nfq.cli"', str(candidate)]
        if candidate and subprocess.run(probe, env=env, cwd="/", capture_output=True).returncode == 0:
            return candidate
    pytest.fail("no Python interpreter that nobody may run", pytrace=False)


@pytest.fixture(scope="module")
def gate(lab):
    """One daemon for the module, its files where nobody can reach them (conftest's
    make_gate keeps them under tmp_path)."""
    workdir = lab.state_dir / "local-users"
    workdir.mkdir(mode=0o755)
    gate = Gate(lab, workdir, "forward", state=str(workdir / "state" / "logins.sqlite"))
    gate.up()
    gate.start()
    yield gate
    code = gate.stop()
    gate.down()
    assert code == 0, gate.log()
    assert mangle_rules(lab, gate.host) == gate.rules_before, "`down` left rules behind"
    assert "Traceback" not in gate.log(), gate.log()
    shutil.rmtree(workdir)


@pytest.fixture
def run(lab, gate, python, env):
    """run(user, *argv): argv in gw as `user`; a leading "sapd-nfq" is the CLI
    with the gate's config (or `config`), a leading "-c" a Python script."""
    def run(user: str, *argv: str, config: Path | None = None) -> subprocess.CompletedProcess:
        if argv[0] == "sapd-nfq":
            argv = (python, "-m", "sapd_nfq", *argv[1:], "--config", str(config or gate.path))
        elif argv[0] == "-c":
            argv = (python, *argv)
        prefix = NOBODY if user == "nobody" else []
        return lab.run(gate.host, [*prefix, *argv], check=False, capture_output=True, text=True,
                       cwd="/", env=env, timeout=CLI_TIMEOUT)
    return run


def refused(done: subprocess.CompletedProcess, why: str = "permission denied") -> bool:
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode != 0, done.stdout + done.stderr
    assert why in done.stderr.lower(), done.stderr
    return True


def auth_list(run) -> str:
    done = run("root", "sapd-nfq", "auth", "list")
    assert done.returncode == 0, done.stderr
    return done.stdout


def reloads(run) -> int:
    done = run("root", "sapd-nfq", "status", "--json")
    assert done.stdout, done.stderr
    return json.loads(done.stdout)["workers"][0]["reloads"]


# --- the control socket ------------------------------------------------------------

@pytest.mark.parametrize("user", USERS)
def test_status_and_reload(run, user):
    before = reloads(run)
    status, reload = run(user, "sapd-nfq", "status"), run(user, "sapd-nfq", "reload")
    if user == "nobody":
        assert refused(status) and "it is root's" in status.stderr
        assert refused(reload) and "queue-0.sock" in reload.stderr
        assert "running" not in status.stdout, "no partial status either"
        assert reloads(run) == before
    else:
        assert status.returncode == 0 and "queue 0 running" in status.stdout, status.stdout + status.stderr
        assert reload.returncode == 0 and "reloaded" in reload.stdout, reload.stdout + reload.stderr
        assert reloads(run) == before + 1


@pytest.mark.parametrize("user", USERS)
def test_connecting_to_the_socket(run, gate, user):
    done = run(user, "-c", CONNECT, str(gate.config.run_dir / "queue-0.sock"))
    if user == "nobody":
        assert done.returncode != 0 and "PermissionError" in done.stderr, done.stdout + done.stderr
    else:
        assert done.returncode == 0 and json.loads(done.stdout)["logins_held"] >= 0, done.stderr


@pytest.fixture
def loosened(gate):
    """The run_dir and the socket opened to everyone, as a careless admin might."""
    sock = gate.config.run_dir / "queue-0.sock"
    gate.config.run_dir.chmod(0o755)
    sock.chmod(0o666)
    yield sock
    gate.config.run_dir.chmod(0o700)
    sock.chmod(0o600)


@pytest.mark.parametrize("user", USERS)
def test_the_daemon_checks_the_peer_when_the_modes_do_not(run, gate, loosened, user):
    before, mark = reloads(run), len(gate.log_lines())
    connect, reload = run(user, "-c", CONNECT, str(loosened)), run(user, "sapd-nfq", "reload")
    if user == "nobody":
        assert connect.returncode != 0 and json.loads(connect.stdout)["denied"], connect.stdout
        assert "logins_held" not in connect.stdout
        assert refused(reload)
        gate.wait_for_log(r"control socket: refused 'reload' from uid 65534", after=mark)
        assert reloads(run) == before
    else:
        assert connect.returncode == 0, connect.stdout + connect.stderr
        assert reload.returncode == 0, reload.stderr
        assert reloads(run) == before + 1


# --- the login table -----------------------------------------------------------------

@pytest.mark.parametrize("user", USERS)
def test_auth_add(run, lab, fresh, user):
    client = fresh()
    done = run(user, "sapd-nfq", "auth", "add", client, "--user", "mallory")
    if user == "nobody":
        assert refused(done)
        assert client not in auth_list(run)
        assert relay_refused(lab, client)
    else:
        assert done.returncode == 0, done.stderr
        wait_relays(lab, client)


@pytest.mark.parametrize("user", USERS)
def test_auth_del(run, fresh, user):
    client = fresh()
    assert run("root", "sapd-nfq", "auth", "add", client, "--user", "alice").returncode == 0
    done = run(user, "sapd-nfq", "auth", "del", client)
    if user == "nobody":
        assert refused(done)
        assert client in auth_list(run)
    else:
        assert done.returncode == 0, done.stderr
        assert client not in auth_list(run)


@pytest.mark.parametrize("user", USERS)
@pytest.mark.parametrize("command", [["auth", "list"], ["status", "--json"],
                                     ["check", "--client", "{client}", "--from", LOCAL, "--to", "x@ext.example"]],
                         ids=lambda c: c[0])
def test_reading_the_table_through_the_cli(run, fresh, user, command):
    client = fresh()
    assert run("root", "sapd-nfq", "auth", "add", client, "--user", "alice").returncode == 0
    done = run(user, "sapd-nfq", *(arg.format(client=client) for arg in command))
    if user == "nobody":
        assert refused(done)
        assert client not in done.stdout and "alice" not in done.stdout
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert command[0] == "status" or client in done.stdout or "row 2" in done.stdout, done.stdout


@pytest.mark.parametrize("user", USERS)
def test_writing_the_sqlite_file(run, lab, gate, fresh, user):
    client = fresh()
    done = run(user, "-c", SQL, gate.config.state, "write", client)
    if user == "nobody":
        assert done.returncode != 0 and "unable to open database file" in done.stderr, done.stderr
        assert client not in auth_list(run)
        assert relay_refused(lab, client)
    else:
        assert done.returncode == 0, done.stderr
        wait_relays(lab, client)  # the attack this guards against: the row opens the relay


@pytest.mark.parametrize("user", USERS)
def test_reading_the_sqlite_file(run, gate, fresh, user):
    client = fresh()
    assert run("root", "sapd-nfq", "auth", "add", client, "--user", "alice").returncode == 0
    done = run(user, "-c", SQL, gate.config.state, "read")
    if user == "nobody":
        assert done.returncode != 0 and client not in done.stdout, done.stdout
    else:
        assert done.returncode == 0 and client in done.stdout, done.stderr


def test_the_daemon_refuses_a_state_directory_others_may_write(lab, gate, env):
    loose = Path(gate.config.state).parent.with_name("loose-state")
    loose.mkdir()
    loose.chmod(0o777)
    config = gate.path.with_name("loose.toml")
    config.write_text(gate.path.read_text().replace(gate.config.state, f"{loose}/logins.sqlite")
                      .replace(str(gate.config.run_dir), f"{loose}-run"))
    try:
        # The daemon needs the virtualenv (netfilterqueue); it refuses before binding a queue.
        done = lab.run(gate.host, [sys.executable, "-m", "sapd_nfq", "run", "--config", str(config)],
                       check=False, capture_output=True, text=True, cwd="/", env=env, timeout=CLI_TIMEOUT)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert f"state directory {loose} is writable by group and others" in done.stderr, done.stderr
        assert "chmod 700" in done.stderr
        assert list(loose.iterdir()) == [], "refused before SQLite created anything in it"
    finally:
        loose.rmdir()
        config.unlink()


# --- the config's secret -----------------------------------------------------------

@pytest.fixture
def secret_config(gate):
    """A config whose `state` is a Redis URL with a password, root-only."""
    path = gate.path.with_name("redis.toml")
    path.write_text(f'virtusertable = "{gate.virtusertable}"\n'
                    f'state = "redis://:{SECRET}@198.18.0.9:6379/0"\n'
                    f'run_dir = "{gate.config.run_dir}-redis"\n')
    path.chmod(0o600)
    yield path
    path.unlink()


@pytest.mark.parametrize("user", USERS)
def test_reading_the_config_with_a_redis_password(run, secret_config, user):
    cat, cli = run(user, "cat", str(secret_config)), run(user, "sapd-nfq", "reload", config=secret_config)
    if user == "nobody":
        assert cat.returncode != 0 and SECRET not in cat.stdout
        assert refused(cli, why="cannot read") and SECRET not in cli.stdout + cli.stderr
    else:
        assert SECRET in cat.stdout
        assert "cannot read" not in cli.stderr and "warning" not in cli.stderr, cli.stderr


def test_a_readable_config_with_a_password_is_warned_about(run, secret_config):
    """The mode that protects it, undone: nobody reads the password, and the CLI says so."""
    secret_config.chmod(0o644)
    assert SECRET in run("nobody", "cat", str(secret_config)).stdout
    cli = run("root", "sapd-nfq", "reload", config=secret_config)
    assert (f"warning: {secret_config} holds the Redis password ('state') and is readable by "
            f"group and others (mode 0644); chmod 600 {secret_config}") in cli.stderr, cli.stderr
    assert SECRET not in cli.stderr

