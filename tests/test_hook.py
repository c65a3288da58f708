"""The hook socket's one request, and the socket itself: its mode, its group, one line."""

from __future__ import annotations

import grp
import os
import socket

import pytest

from sapd_nfq.engine.logins import MemoryLoginStore
from sapd_nfq.learners.hook import HookLogin, HookServer, parse_request


@pytest.mark.parametrize("data, expected", [
    (b"LOGIN 198.18.1.2 alice\n", HookLogin("198.18.1.2", "alice")),
    (b"LOGIN 2001:db8:1::2\r\n", HookLogin("2001:db8:1::2", None)),
    (b"LOGIN ::ffff:198.18.1.2 alice smith\n", HookLogin("198.18.1.2", "alice smith")),
])
def test_the_one_request(data, expected):
    assert parse_request(data) == expected


@pytest.mark.parametrize("data", [
    b"LOGIN 198.18.1.2 alice",            # no line end
    b"LOGOUT 198.18.1.2\n", b"DEL 198.18.1.2\n", b"login 198.18.1.2\n",
    b"LOGIN\n", b"LOGIN  alice\n", b"LOGIN example.org alice\n",
    b"LOGIN 198.18.1.2 al\x00ice\n", b"LOGIN 198.18.1.2 a\nLOGIN 198.18.6.6 b\n",
    b"LOGIN 198.18.1.2 " + b"a" * 600 + b"\n",
])
def test_anything_else_is_refused(data):
    with pytest.raises(ValueError):
        parse_request(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to the hook's group needs root")
def test_the_socket_is_for_root_and_its_group_only(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    server = HookServer(tmp_path / "hook.sock", group)
    try:
        st = os.stat(tmp_path / "hook.sock")
        assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o660, 0, os.getgid())
        store = MemoryLoginStore()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "hook.sock"))
            client.sendall(b"LOGIN 198.18.1.2 alice\n")
            login = None
            while login is None:
                login = server.serve_one(store, 60, 100.0)
            assert client.recv(16) == b"OK\n"
        [entry] = store.entries(100.0)
        assert (entry.address, entry.user, entry.source) == ("198.18.1.2", "alice", "hook")
    finally:
        server.close()
    assert not (tmp_path / "hook.sock").exists()
