"""The daemon's control socket: one JSON request a connection, one reply.

`sapd-nfq status` and `sapd-nfq reload` talk to the running daemon through
it. Only root may ask, and three things hold it so: the socket is 0600 in a
directory that is ours and that no one else may write, and each side checks
the other's uid (SO_PEERCRED): the daemon answers only root, and the CLI
believes only a root daemon, not a socket someone else put in its place.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..engine.errors import SapdError
from ..wiring.access import AccessError, denied, ours, peer_uid, private_dir
from ..wiring.config import Config
from ..wiring.logsetup import LOGGER

MAX_REQUEST = 4096

log = logging.getLogger(LOGGER)


class DaemonNotRunning(SapdError):
    pass


def socket_path(config: Config, queue: int) -> Path:
    return Path(config.run_dir) / f"queue-{queue}.sock"


def worker_queues(config: Config) -> range:
    return range(config.queue, config.queue + config.workers)


def request(config: Config, queue: int, command: str, timeout: float = 5.0) -> dict[str, Any]:
    path = socket_path(config, queue)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            if not ours(server := peer_uid(sock)):
                raise AccessError(f"control socket {path} is served by uid {server}, not by root: "
                                  "not talking to it")
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise DaemonNotRunning(f"no daemon answers on {path}") from None
    except PermissionError:
        raise denied("control socket", path) from None
    except OSError as exc:
        raise DaemonNotRunning(f"control socket {path}: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise DaemonNotRunning(f"control socket {path}: no valid reply") from None
    if not isinstance(reply, dict):
        raise DaemonNotRunning(f"control socket {path}: no valid reply")
    if reply.get("denied"):
        raise denied("control socket", path)
    return reply


class ControlServer:
    """Listens on the control socket; `handler(command) -> dict` answers."""

    def __init__(self, config: Config, queue: int, handler: Callable[[str], dict[str, Any]]) -> None:
        self.path = socket_path(config, queue)
        private_dir(self.path.parent, "run_dir")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        self.sock.listen(8)
        self.sock.setblocking(False)
        self._handler = handler

    def fileno(self) -> int:
        return self.sock.fileno()

    def serve_one(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            reply = self._answer(conn)
            try:
                conn.sendall(reply.encode() + b"\n")
            except OSError:
                pass

    def _answer(self, conn: socket.socket) -> str:
        # A short timeout: a stuck client must not stall the packet loop.
        conn.settimeout(0.5)
        try:
            data = b""
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = conn.recv(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            command = str(json.loads(data or b"{}").get("command", ""))
        except (OSError, ValueError, AttributeError) as exc:
            return json.dumps({"ok": False, "error": f"bad control request: {exc}"})
        # Checked after the request is read: closing on unread data would
        # reset the connection before the client read why.
        if not ours(client := peer_uid(conn)):
            # Reached only if someone loosened the socket's or run_dir's mode.
            log.warning("control socket: refused %.40r from uid %d", command, client)
            return json.dumps({"ok": False, "denied": True, "error": "permission denied"})
        try:
            return json.dumps(self._handler(command))
        except Exception:  # a control request must never stop the packet loop
            log.exception("control request %r failed", command)
            return json.dumps({"ok": False, "error": "internal error, see the daemon's log"})

    def close(self) -> None:
        self.sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
