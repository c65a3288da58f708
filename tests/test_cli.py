"""The command line: check, auth, replay's text output, errors and exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from sapd_nfq import cli
from sapd_nfq.lab.mail import VIRTUSERTABLE

CAPTURES = Path(__file__).parent / "captures"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "sapd-nfq.toml"
    path.write_text(f'virtusertable = "{VIRTUSERTABLE}"\nstate = "logins.sqlite"\n')
    return str(path)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_pass_fail_and_the_deciding_row(capsys, config):
    code, out, _ = run(capsys, "check", "--client", "198.18.1.2", "--from", "dave@external.example",
                       "--to", "alice@lab.example", "--config", config)
    assert code == 0 and out.startswith("PASS  row 1: recipient local")
    code, out, _ = run(capsys, "check", "--client", "198.18.1.2", "--from", "alice@lab.example",
                       "--to", "dave@external.example", "--config", config)
    assert code == 1 and out.startswith("FAIL  row 3:")


def test_check_sees_a_login_added_with_auth(capsys, config):
    assert run(capsys, "auth", "add", "198.18.1.2", "--user", "alice", "--config", config)[0] == 0
    code, out, _ = run(capsys, "check", "--client", "198.18.1.2", "--from", "alice@lab.example",
                       "--to", "dave@external.example", "--config", config)
    assert code == 0 and out.startswith("PASS  row 2:")
    code, out, _ = run(capsys, "auth", "list", "--config", config)
    assert "198.18.1.2" in out and "alice" in out and "manual" in out
    assert run(capsys, "auth", "del", "198.18.1.2", "--config", config)[0] == 0
    assert run(capsys, "auth", "del", "198.18.1.2", "--config", config)[0] == 1
    assert "no logins held" in run(capsys, "auth", "list", "--config", config)[1]


def test_bad_input_exits_2_with_a_clear_message(capsys, config, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--client", "not-an-ip", "--from", "a@b", "--to", "c@d", "--config", config])
    assert exc.value.code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("smtp_port = [25]\n")
    code, _, err = run(capsys, "check", "--client", "198.18.1.2", "--from", "a@b", "--to", "c@d",
                       "--config", str(bad))
    assert code == 2 and "unknown key 'smtp_port'" in err and "smtp_ports" in err


def test_broken_virtusertable_names_file_and_line(capsys, tmp_path):
    table = tmp_path / "virtusertable"
    table.write_text("alice@lab.example alice\nbroken-line-without-value\n")
    config = tmp_path / "c.toml"
    config.write_text(f'virtusertable = "{table}"\nstate = "memory"\n')
    code, _, err = run(capsys, "check", "--client", "198.18.1.2", "--from", "a@b", "--to", "c@d",
                       "--config", str(config))
    assert code == 2 and f"{table}:2:" in err


def test_replay_text_output(capsys, config):
    code, out, err = run(capsys, "replay", str(CAPTURES / "smtp_pipelining.pcap"), "--config", config)
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert "PASS client=198.18.1.2" in lines[0] and "'alice@lab.example'" in lines[0]
    # the capture's MTA is Postfix: erin is refused in place with a NOOP, so
    # its 250 (to the RCPT as captured) reads as Postfix's answer to that
    assert "FAIL client=198.18.1.2" in lines[1] and "row 4" in lines[1]
    # the message went on to alice: Postfix's queue id, on the session's ports
    assert "QUEUED client=198.18.1.2 client_port=58622 " in lines[2]
    assert lines[2].endswith(" queue_id=4C9F1162625")
    assert "pass=1 fail=1" in err


def test_auth_add_and_del_return_once_a_running_daemon_has_read_them(capsys, tmp_path):
    """The next session after `auth add` is judged with it: the command has the
    daemon read the store, and waits for it (here a control socket served
    as the daemon serves it, over the daemon's own replica)."""
    import logging
    import selectors
    import threading
    import time
    from dataclasses import replace

    from statuses import WORKER

    from sapd_nfq.admin.control import ControlServer
    from sapd_nfq.wiring.build import daemon_logins
    from sapd_nfq.wiring.config import load_config

    path = tmp_path / "sapd-nfq.toml"
    path.write_text(f'virtusertable = "{VIRTUSERTABLE}"\nstate = "logins.sqlite"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')
    config = load_config(path)
    replica = daemon_logins(config, logging.getLogger("sapd-nfq.test-cli"))
    replica.start()

    def answer(command: str) -> dict:
        if command == "logins-changed":
            return {"ok": True, "ticket": replica.request_reload()}
        return replace(WORKER, store=replica.stats()).as_json()

    server = ControlServer(config, config.queue, answer)
    done = threading.Event()

    def loop() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            while not done.is_set():
                if sel.select(timeout=0.1):
                    server.serve_one()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        assert run(capsys, "auth", "add", "198.18.1.2", "--config", str(path))[0] == 0
        assert replica.is_logged_in("198.18.1.2", time.time())
        assert run(capsys, "auth", "del", "198.18.1.2", "--config", str(path))[0] == 0
        assert not replica.is_logged_in("198.18.1.2", time.time())
    finally:
        done.set()
        thread.join(5)
        server.close()
        replica.close()


def test_version_names_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"sapd-nfq {metadata.version('sapd-nfq')}\n"


def test_version_of_a_source_checkout_reads_pyproject(monkeypatch):
    import tomllib
    from importlib import metadata

    import sapd_nfq

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    with open(sapd_nfq._PYPROJECT, "rb") as file:
        assert sapd_nfq.version() == tomllib.load(file)["project"]["version"]
    monkeypatch.setattr(sapd_nfq, "_PYPROJECT", sapd_nfq._PYPROJECT.with_name("absent.toml"))
    assert sapd_nfq.version() == "unknown"


def test_auth_why_and_check_take_the_login_prefixes(capsys, tmp_path):
    path = tmp_path / "sapd-nfq.toml"
    path.write_text(f'virtusertable = "{VIRTUSERTABLE}"\nstate = "logins.sqlite"\n'
                    f'run_dir = "{tmp_path / "run"}"\n')
    config = str(path)
    relay = ("--from", "alice@lab.example", "--to", "dave@external.example", "--config", config)
    code, out, _ = run(capsys, "auth", "add", "2001:db8:1:2::a", "--user", "alice", "--config", config)
    assert code == 0 and out == "added 2001:db8:1:2::/64 for 1800 s\n"  # /64 by default
    assert run(capsys, "check", "--client", "2001:db8:1:2:ffff::b", *relay)[0] == 0
    assert run(capsys, "check", "--client", "2001:db8:1:3::a", *relay)[0] == 1
    code, out, _ = run(capsys, "why", "2001:db8:1:2::b", "--config", config)
    assert "logged in as alice" in out and "(the login of 2001:db8:1:2::/64)" in out
    code, out, _ = run(capsys, "auth", "del", "2001:db8:1:2::ffff", "--config", config)
    assert code == 0 and out == "removed 2001:db8:1:2::/64\n"
    assert run(capsys, "check", "--client", "2001:db8:1:2::a", *relay)[0] == 1
    # the address alone: IPv4 by default, IPv6 at 128
    path.write_text(path.read_text() + "ipv6_login_prefix = 128\n")
    assert run(capsys, "auth", "add", "2001:db8:1:2::a", "--config", config)[1].startswith(
        "added 2001:db8:1:2::a ")
    assert run(capsys, "check", "--client", "2001:db8:1:2::b", *relay)[0] == 1
    assert run(capsys, "auth", "add", "198.18.1.2", "--config", config)[1].startswith("added 198.18.1.2 ")
    assert run(capsys, "check", "--client", "198.18.1.3", *relay)[0] == 1
