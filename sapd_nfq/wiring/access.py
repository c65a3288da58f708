"""Who may reach what: everything that can create a login is root's.

A login opens the relay, so the control socket, the SQLite state file and
the config file (it may hold the Redis password, and it names the trusted
networks) are out of a local user's reach. "Ours" is root or the user
sapd-nfq runs as; delegation is left to sudo, which can grant single
commands. A directory others may write is refused rather than fixed: a file
planted in it (a socket, an SQLite -wal) would already be trusted, and it
may be shared (/tmp) so that tightening it would break others.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..engine.errors import SapdError
from ..logins import store_kind
from .config import Config

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AccessError(SapdError):
    """A file others could change or read, or a user who may not do this."""


def ours(uid: int) -> bool:
    return uid in (0, os.geteuid())


def denied(what: str, path: Path) -> AccessError:
    return AccessError(f"{what} {path}: permission denied; it is root's (run sapd-nfq as root)")


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return int(uid)


def _who(bits: int) -> str:
    """"group", "others" or both, for the permission bits set in `bits`."""
    return " and ".join(who for who, mask in (("group", 0o070), ("others", 0o007)) if bits & mask)


def private_dir(path: Path, what: str) -> None:
    """Create `path` mode 0700 if missing; refuse one that is not ours or
    that group or others may write."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.stat()
    except PermissionError:
        raise denied(what, path) from None
    if not ours(st.st_uid):
        raise AccessError(f"{what} {path} belongs to uid {st.st_uid}, who could plant files in it; "
                          f"chown root {path}")
    if st.st_mode & 0o022:
        who = _who(st.st_mode & 0o022)
        raise AccessError(f"{what} {path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o}), "
                          f"who could plant files in it; chmod 700 {path}")


def private_file(path: Path, what: str) -> None:
    """Refuse an existing file that is not ours or that group or others may
    read or write (a missing one is created private by its owner)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return
    except PermissionError:
        raise denied(what, path) from None
    if not ours(st.st_uid):
        raise AccessError(f"{what} {path} belongs to uid {st.st_uid}; chown root {path}")
    if st.st_mode & 0o077:
        who = _who(st.st_mode & 0o077)
        raise AccessError(f"{what} {path} is open to {who} (mode {stat.S_IMODE(st.st_mode):04o}); "
                          f"chmod 600 {path}")


def check_state(spec: str) -> None:
    """Refuse an SQLite state file whose directory or files (the database,
    its -wal and -shm) a local user could read or change."""
    if store_kind(spec) != "sqlite":
        return
    path = Path(spec)
    private_dir(path.parent, "state directory")
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        private_file(name, "state file")


def holds_secret(config: Config) -> bool:
    """Whether `state` is a Redis URL with a password (in its user part or,
    as redis-py also reads it, in its query)."""
    if store_kind(config.state) != "redis":
        return False
    parts = urlsplit(config.state)
    return bool(parts.password or parse_qs(parts.query).get("password"))


def config_warnings(path: Path, config: Config) -> list[str]:
    """What is wrong with who may read or write the config file at `path`."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return []
    found = []
    if holds_secret(config) and mode & 0o044:
        found.append(f"{path} holds the Redis password ('state') and is readable by "
                     f"{_who(mode & 0o044)} (mode {stat.S_IMODE(mode):04o}); chmod 600 {path}")
    if mode & 0o022:
        found.append(f"{path} is writable by {_who(mode & 0o022)} (mode {stat.S_IMODE(mode):04o}), "
                     f"who could make any client relay; chmod go-w {path}")
    return found
