"""The daemon's control socket, without a daemon: one request, one reply."""

from __future__ import annotations

import selectors
import stat
import threading
from dataclasses import replace

import pytest

from sapd_nfq.admin.control import ControlServer, DaemonNotRunning, request, socket_path
from sapd_nfq.wiring.config import Config


def serve(server: ControlServer) -> threading.Thread:
    """Answer one request the way the daemon's loop does: select, then serve_one()."""
    def loop() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(server, selectors.EVENT_READ)
            if sel.select(timeout=5):
                server.serve_one()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def config(tmp_path):
    return replace(Config.default(), run_dir=tmp_path / "run", queue=3)


def test_status_round_trip_and_socket_mode(config):
    server = ControlServer(config, 3, lambda command: {"ok": True, "echo": command})
    try:
        assert stat.S_IMODE(socket_path(config, 3).stat().st_mode) == 0o600
        thread = serve(server)
        assert request(config, 3, "status") == {"ok": True, "echo": "status"}
        thread.join(5)
    finally:
        server.close()
    assert not socket_path(config, 3).exists()


def test_a_failing_handler_gets_an_error_reply_not_a_dead_daemon(config):
    def broken(command):
        raise TypeError("not JSON serialisable")

    server = ControlServer(config, 3, broken)
    try:
        thread = serve(server)
        reply = request(config, 3, "status")
        thread.join(5)
    finally:
        server.close()
    assert reply["ok"] is False and "internal error" in reply["error"]


def test_no_daemon_is_a_clear_error(config):
    with pytest.raises(DaemonNotRunning, match="no daemon answers"):
        request(config, 3, "status")
