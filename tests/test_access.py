"""Who may reach what: private directories and files, the config's secret,
and the control socket's peer check (the lab test runs them as a real
unprivileged user against a running daemon)."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from sapd_nfq import cli
from sapd_nfq.admin.control import ControlServer, request, socket_path
from sapd_nfq.lab.mail import VIRTUSERTABLE
from sapd_nfq.wiring.access import AccessError, config_warnings, holds_secret, private_dir
from sapd_nfq.wiring.build import open_logins
from sapd_nfq.wiring.config import Config, load_config
from sapd_nfq.wiring.logsetup import LOGGER

CAPTURES = Path(__file__).parent / "captures"
SECRET = "redis://:s3cret@198.18.0.9:6379/0"
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing owners and uids needs root")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- directories and the SQLite state ---------------------------------------------

def test_a_missing_directory_is_created_private(tmp_path):
    private_dir(tmp_path / "a" / "run", "run_dir")
    assert mode(tmp_path / "a" / "run") == 0o700


@pytest.mark.parametrize(("bits", "who"), [(0o777, "group and others"), (0o1777, "group and others"),
                                           (0o770, "group"), (0o757, "others")])
def test_a_directory_others_may_write_is_refused(tmp_path, bits, who):
    loose = tmp_path / "run"
    loose.mkdir()
    loose.chmod(bits)
    with pytest.raises(AccessError, match=f"run_dir {loose} is writable by {who} .*; chmod 700 {loose}"):
        private_dir(loose, "run_dir")
    assert mode(loose) == bits, "refused, not changed: the directory may be shared"


def test_a_directory_others_may_only_read_is_kept(tmp_path):
    (tmp_path / "run").mkdir(mode=0o755)
    private_dir(tmp_path / "run", "run_dir")


@needs_root
def test_a_directory_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "state"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, -1)
    with pytest.raises(AccessError, match=f"belongs to uid {NOBODY}"):
        private_dir(theirs, "state directory")


def state_config(path: Path) -> Config:
    return replace(Config.default(), state=str(path))


def test_the_sqlite_store_and_its_wal_and_shm_are_private(tmp_path):
    path = tmp_path / "state" / "logins.sqlite"
    logins = open_logins(state_config(path))
    try:
        logins.add("198.18.1.2", "alice", 0.0, 1e12)
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert [mode(f) for f in files] == [0o600] * 3
        assert mode(path.parent) == 0o700
    finally:
        logins.close()


def test_a_world_writable_state_directory_is_refused(tmp_path):
    (tmp_path / "state").mkdir(mode=0o777)
    (tmp_path / "state").chmod(0o777)
    with pytest.raises(AccessError, match="state directory .* writable by group and others"):
        open_logins(state_config(tmp_path / "state" / "logins.sqlite"))
    assert not (tmp_path / "state" / "logins.sqlite").exists()


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_a_state_file_others_may_read_is_refused(tmp_path, suffix):
    path = tmp_path / "logins.sqlite"
    open_logins(state_config(path)).close()
    loose = Path(f"{path}{suffix}")
    loose.touch()
    loose.chmod(0o644)
    with pytest.raises(AccessError, match=f"state file {loose} is open to group and others .*chmod 600"):
        open_logins(state_config(path))


@needs_root
def test_a_state_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "logins.sqlite"
    open_logins(state_config(path)).close()
    os.chown(path, NOBODY, -1)
    with pytest.raises(AccessError, match=f"belongs to uid {NOBODY}"):
        open_logins(state_config(path))


# -- the config file's secret ----------------------------------------------------

@pytest.mark.parametrize(("state", "secret"), [
    (SECRET, True),
    ("rediss://gate:s3cret@198.18.0.9/0", True),
    ("unix:///run/redis/redis.sock?db=0&password=s3cret", True),
    ("redis://gate@198.18.0.9/0", False),
    ("unix:///run/redis/redis.sock", False),
    ("/var/lib/sapd-nfq/logins.sqlite", False),
    ("memory", False),
])
def test_which_states_hold_a_secret(state, secret):
    assert holds_secret(replace(Config.default(), state=state)) is secret


def write_config(tmp_path: Path, bits: int, state: str = SECRET) -> Path:
    path = tmp_path / "sapd-nfq.toml"
    path.write_text(f'virtusertable = "{VIRTUSERTABLE}"\nstate = "{state}"\n')
    path.chmod(bits)
    return path


@pytest.mark.parametrize(("bits", "who"), [(0o644, "group and others"), (0o640, "group"), (0o604, "others")])
def test_a_readable_secret_is_a_warning_naming_file_and_fix(tmp_path, bits, who):
    path = write_config(tmp_path, bits)
    assert config_warnings(path, load_config(path)) == [
        f"{path} holds the Redis password ('state') and is readable by {who} "
        f"(mode {bits:04o}); chmod 600 {path}"]


def test_no_warning_for_a_private_secret_or_a_public_file_without_one(tmp_path):
    path = write_config(tmp_path, 0o600)
    assert config_warnings(path, load_config(path)) == []
    path = write_config(tmp_path, 0o644, state="logins.sqlite")
    assert config_warnings(path, load_config(path)) == []


def test_a_config_others_may_write_is_a_warning(tmp_path):
    path = write_config(tmp_path, 0o664, state="logins.sqlite")
    assert config_warnings(path, load_config(path)) == [
        f"{path} is writable by group (mode 0664), who could make any client relay; chmod go-w {path}"]


def test_commands_that_load_the_config_print_the_warning(capsys, tmp_path):
    path = write_config(tmp_path, 0o644)
    code = cli.main(["replay", str(CAPTURES / "smtp_pipelining.pcap"), "--config", str(path)])
    err = capsys.readouterr().err
    assert code == 0
    assert f"sapd-nfq: warning: {path} holds the Redis password" in err and "chmod 600" in err
    assert "s3cret" not in err
    path.chmod(0o600)
    cli.main(["replay", str(CAPTURES / "smtp_pipelining.pcap"), "--config", str(path)])
    assert "warning" not in capsys.readouterr().err


def test_run_logs_the_warning(monkeypatch, caplog, tmp_path):
    import sapd_nfq.kernel.supervise
    import sapd_nfq.wiring.logsetup

    # Neither a real daemon nor the host's syslog: the logger alone, seen by caplog.
    monkeypatch.setattr(sapd_nfq.wiring.logsetup, "setup_logging", lambda level: logging.getLogger("sapd-nfq.test"))
    monkeypatch.setattr(sapd_nfq.kernel.supervise, "run_workers", lambda config, path: 0)
    path = write_config(tmp_path, 0o640)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["run", "--config", str(path)]) == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{path} holds the Redis password ('state') and is readable by group (mode 0640); chmod 600 {path}"]


# -- the control socket's peer check ---------------------------------------------

@pytest.fixture
def control_config():
    # Not under tmp_path: pytest's base directory is root's alone, and nobody
    # must get as far as the socket for the daemon's own check to be tested.
    with tempfile.TemporaryDirectory(prefix="sapd-access-") as top:
        os.chmod(top, 0o755)
        yield replace(Config.default(), run_dir=Path(top) / "run", queue=3)


def serve_one(server: ControlServer) -> threading.Thread:
    def loop() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            if sel.select(timeout=5):
                server.serve_one()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def fork_as_nobody(action) -> int:
    """Run `action` in a child process with uid and gid nobody; the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = action()
        finally:
            os._exit(code)
    return pid


def as_nobody(action) -> int:
    """`action`'s exit status, run as nobody."""
    return os.waitstatus_to_exitcode(os.waitpid(fork_as_nobody(action), 0)[1])


def test_a_run_dir_others_may_write_is_refused(control_config):
    control_config.run_dir.mkdir(mode=0o777)
    control_config.run_dir.chmod(0o777)
    with pytest.raises(AccessError, match="run_dir .* writable by group and others"):
        ControlServer(control_config, 3, lambda command: {"ok": True})


@needs_root
def test_the_daemon_answers_no_other_user_even_through_a_loosened_socket(control_config, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger(LOGGER), "propagate", True)  # to caplog
    asked = []
    server = ControlServer(control_config, 3, lambda command: asked.append(command) or {"ok": True})
    control_config.run_dir.chmod(0o755)
    socket_path(control_config, 3).chmod(0o666)

    def reload() -> int:
        try:
            request(control_config, 3, "reload")
        except AccessError as exc:
            return 0 if "permission denied" in str(exc) else 1
        return 1

    try:
        thread = serve_one(server)
        assert as_nobody(reload) == 0
        thread.join(5)
        assert asked == []
        assert "refused 'reload' from uid 65534" in caplog.text
        thread = serve_one(server)
        assert request(control_config, 3, "reload") == {"ok": True}
        thread.join(5)
    finally:
        server.close()


@needs_root
def test_the_cli_does_not_believe_a_socket_another_user_serves(control_config):
    """Someone else's socket in the daemon's place: `status` would show their figures."""
    control_config.run_dir.mkdir(mode=0o777)
    control_config.run_dir.chmod(0o777)
    ready_r, ready_w = os.pipe()

    def impostor() -> int:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(socket_path(control_config, 3)))
            sock.listen(1)
            os.write(ready_w, b"x")
            sock.settimeout(5)
            conn, _ = sock.accept()
            conn.sendall(b'{"ok": true}\n')
            conn.close()
        return 0

    pid = fork_as_nobody(impostor)
    try:
        os.read(ready_r, 1)
        with pytest.raises(AccessError, match=f"served by uid {NOBODY}, not by root"):
            request(control_config, 3, "status", timeout=1.0)
    finally:
        os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
