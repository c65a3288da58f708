"""The post-login hook socket: a mail server tells the gate "this address logged in as this user".

Dovecot runs packaging/sapd-nfq-postlogin after every login (its post-login
scripting, `script-login`), as its post-login service's user, not root. That
path gets the least privilege that works:

- a unix socket of its own (`login_hook`), mode 0660, owned by root and the
  group `login_hook_group`: only members of that group (and root) can connect.
  It lives in a directory of its own (run_dir is root's alone), which must be
  ours and writable by no one else: a socket planted there would be trusted;
- the peer's credentials (SO_PEERCRED) are checked again on every connection,
  so a socket file whose mode was loosened still serves only that group;
- one request a connection, one line: `LOGIN <address> [<user>]`. Anything
  else is refused; nothing can be removed, listed or reconfigured this way.

A member of the group can still claim any address: give the group to the
post-login service's user alone. Source "hook".
"""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from ..engine.addresses import normalize_ip
from ..engine.logins import LoginStore, StoreError
from ..wiring.access import AccessError, ours
from ..wiring.logsetup import LOGGER

MAX_REQUEST = 512
READ_TIMEOUT = 0.5  # seconds a connected peer has to send its line
MAX_USER = 255

log = logging.getLogger(LOGGER)


@dataclass(frozen=True)
class HookLogin:
    address: str
    user: str | None


def parse_request(data: bytes) -> HookLogin:
    """The one request the socket takes; ValueError for anything else."""
    if len(data) > MAX_REQUEST or not data.endswith(b"\n"):
        raise ValueError("expected one line: LOGIN <address> [<user>]")
    line = data[:-1].removesuffix(b"\r")
    if any(b < 0x20 or b == 0x7F for b in line):
        raise ValueError("control character in the request")
    verb, _, rest = line.partition(b" ")
    address, _, user = rest.partition(b" ")
    if verb != b"LOGIN" or not address:
        raise ValueError("expected LOGIN <address> [<user>]")
    text = user.decode("utf-8", "replace")[:MAX_USER] or None
    return HookLogin(normalize_ip(address.decode("ascii", "replace")), text)


def _groups(pid: int) -> set[int]:
    """A process's supplementary groups: the post-login user may hold the group
    beside its own (SO_PEERCRED names only the primary one)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


class HookServer:
    """Listens on the hook socket; `serve_one()` takes one request."""

    def __init__(self, path: str | os.PathLike[str], group: str) -> None:
        self.path = Path(path)
        try:
            self.gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise OSError(f"login_hook_group: no group {group!r}") from None
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = self.path.parent.stat()
        if not ours(st.st_uid) or st.st_mode & 0o022:
            raise AccessError(f"login_hook: {self.path.parent} is not root's alone to write; "
                              "the hook socket needs a directory others cannot plant files in")
        self.path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # never reachable by others, not even for a moment
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chown(self.path, 0, self.gid)
        os.chmod(self.path, 0o660)
        self.sock.listen(16)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)

    def _allowed(self, conn: socket.socket) -> bool:
        pid, uid, gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return uid == 0 or gid == self.gid or self.gid in _groups(pid)

    def serve_one(self, store: LoginStore, ttl: int, now: float) -> HookLogin | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        with conn:
            conn.settimeout(READ_TIMEOUT)
            try:
                if not self._allowed(conn):
                    conn.sendall(b"ERR not allowed\n")
                    return None
                data = b""
                while len(data) <= MAX_REQUEST and not data.endswith(b"\n"):
                    chunk = conn.recv(MAX_REQUEST + 1)
                    if not chunk:
                        break
                    data += chunk
                try:
                    login = parse_request(data)
                except ValueError as exc:
                    conn.sendall(f"ERR {exc}\n".encode())
                    return None
                try:
                    store.add(login.address, login.user, now, ttl, source="hook")
                except StoreError as exc:
                    log.error("hook login of %s not recorded: %s", login.address, exc)
                    conn.sendall(b"ERR not recorded\n")
                    return None
                conn.sendall(b"OK\n")
                return login
            except OSError:
                return None
