"""The log learner: follows mail servers' log files and records the logins they show.

For logins the wire cannot show (POP3S, IMAPS, STLS, STARTTLS): the server
writes a success line, and `login_logs` names the files to follow. What a line
means is decided in engine/loglines.py (pure, tested by feeding lines); this
module only reads files:

- starts at the end of a file it has not seen before, so history is not
  learned; remembers each file's inode and offset in `run_dir`, and after a
  restart goes on from there, unless the file was replaced meanwhile or the
  daemon was down longer than `auth_ttl` (then from the end: lines that old
  must not open the relay now);
- survives rotation: a renamed file is read to its end before the new one is
  opened from its start; a file truncated in place (copytruncate) is read
  again from its start;
- never blocks the packet path: the daemon calls `poll()` from its loop, and a
  call reads at most READ_BUDGET bytes per file (regular files do not block;
  a follower is opened O_NONBLOCK in case a path names a FIFO);
- bounds lines: a line longer than loglines.MAX_LINE is dropped whole.

Long sessions: Dovecot logs a session's end with the session id of its login
line. While a session is open its login is renewed whenever half the window
has passed, so an IMAP client in IDLE for hours keeps relaying; the end line
stops the renewal and the window then runs out as usual. A session whose end
is never logged (a crash) stops renewing after SESSION_MAX seconds.

A log learner trusts whoever can write the file: follow the server's own log
(Dovecot's `log_path`, root-owned), not a syslog file that any local user can
append to with logger(1).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .engine.logins import LoginStore, StoreError
from .engine.loglines import MAX_LINE, LogLogin, LogSessionEnd, parse_line
from .logsetup import LOGGER

READ_BUDGET = 256 * 1024  # bytes a poll reads from one file
SESSION_MAX = 24 * 3600.0  # seconds a session's login is renewed without its end being seen
MAX_SESSIONS = 65536
SAVE_INTERVAL = 10.0  # seconds between saves of the positions while lines come in
STATE_NAME = "login-logs.json"
HEAD = 256  # bytes of a file's start kept to recognise it after a restart

log = logging.getLogger(LOGGER)


class FileFollower:
    """One log file, read line by line from where we left off, across rotation."""

    def __init__(self, path: str | os.PathLike[str], resume: tuple[int, int, str] | None = None
                 ) -> None:
        self.path = os.fspath(path)
        self._resume = resume  # (inode, offset, head) from before a restart
        self._fd: int | None = None
        self._inode = 0
        self._offset = 0       # stream offset of the first byte not yet returned in a line
        self._partial = b""
        self._skipping = False  # inside a line too long to read
        self._first = True      # the first open starts at the end (or the resumed offset)

    @property
    def position(self) -> tuple[int, int, str] | None:
        """Where we are, and the file's first bytes: an inode number is reused
        once a file is deleted, its first line (with its timestamp) hardly."""
        if self._fd is None:
            return None
        return self._inode, self._offset, self._head(self._fd, self._offset)

    @staticmethod
    def _head(fd: int, offset: int) -> str:
        try:
            return os.pread(fd, min(HEAD, offset), 0).hex()
        except OSError:
            return ""

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
            os.close(fd)
            return False
        self._fd, self._inode = fd, st.st_ino
        start = 0
        if self._first and stat.S_ISREG(st.st_mode):
            resume = self._resume
            if (resume is not None and resume[0] == st.st_ino and resume[1] <= st.st_size
                    and self._head(fd, resume[1]) == resume[2]):
                start = resume[1]
            else:
                start = st.st_size
        self._first = False
        self._offset = start
        self._partial, self._skipping = b"", False
        if start:
            os.lseek(fd, start, os.SEEK_SET)
        return True

    def read_lines(self, budget: int = READ_BUDGET) -> list[bytes]:
        """Complete lines written since the last call (at most about `budget` bytes)."""
        if self._fd is None and not self._open():
            return []
        assert self._fd is not None
        lines: list[bytes] = []
        while budget > 0:
            try:
                data = os.read(self._fd, min(65536, budget))
            except BlockingIOError:
                return lines
            if not data:
                self._rotated()
                return lines
            budget -= len(data)
            self._split(data, lines)
        return lines

    def _split(self, data: bytes, lines: list[bytes]) -> None:
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        for chunk in chunks:
            self._offset += len(chunk) + 1
            if self._skipping:
                self._skipping = False  # the end of a line too long to read
                continue
            lines.append(chunk.removesuffix(b"\r"))
        if len(self._partial) > MAX_LINE:
            self._offset += len(self._partial)
            self._partial, self._skipping = b"", True

    def _rotated(self) -> None:
        """At the end of what we have: has the path moved on to a new file?"""
        assert self._fd is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return  # renamed and not yet recreated: keep the old one
        if st.st_ino != self._inode:
            self.close()  # read to its end already; the new file is read from its start
            self._open()
        elif stat.S_ISREG(st.st_mode) and st.st_size < self._offset + len(self._partial):
            os.lseek(self._fd, 0, os.SEEK_SET)  # copytruncate
            self._offset, self._partial, self._skipping = 0, b"", False


@dataclass
class _Session:
    address: str
    user: str | None
    source: str
    started: float
    renewed: float


class LogLearner:
    """Follows `paths`, records their logins in `store`, renews open sessions."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]], store: LoginStore,
                 auth_ttl: int, state_dir: str | os.PathLike[str] | None) -> None:
        self.store = store
        self.auth_ttl = auth_ttl
        self.state_path = Path(state_dir) / STATE_NAME if state_dir is not None else None
        saved = self._load_state()
        files = saved.get("files", {})
        self.followers = [FileFollower(p, _pair(files.get(os.fspath(p)))) for p in paths]
        self.sessions: dict[str, _Session] = {
            key: _Session(**value) for key, value in saved.get("sessions", {}).items()
            if isinstance(value, dict)}
        self.lines = 0
        self.logins = 0
        self._saved_at = 0.0

    # -- state across restarts ------------------------------------------------

    def _load_state(self) -> dict:
        if self.state_path is None:
            return {}
        try:
            age = time.time() - self.state_path.stat().st_mtime
            if age > self.auth_ttl:
                return {}  # down longer than a window: what was written meanwhile is too old
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def save(self) -> None:
        if self.state_path is None:
            return
        files = {f.path: list(pos) for f in self.followers if (pos := f.position) is not None}
        sessions = {k: vars(s) for k, s in self.sessions.items()}
        tmp = self.state_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps({"files": files, "sessions": sessions}))
            os.replace(tmp, self.state_path)
        except OSError as exc:
            log.error("cannot save the log positions in %s: %s", self.state_path, exc)

    def close(self) -> None:
        self.save()
        for follower in self.followers:
            follower.close()

    # -- the work ---------------------------------------------------------------

    def poll(self, now: float) -> list[LogLogin]:
        """Read what is new in every file; record its logins; renew open sessions."""
        learned: list[LogLogin] = []
        for follower in self.followers:
            for line in follower.read_lines():
                self.lines += 1
                event = parse_line(line)
                if isinstance(event, LogLogin):
                    if self._record(event, now):
                        learned.append(event)
                elif isinstance(event, LogSessionEnd):
                    self.sessions.pop(event.session, None)
        self._renew(now)
        # saved at once after a login, and regularly otherwise: the file's mtime then
        # also tells a restart how long the daemon was away
        if learned or now - self._saved_at >= SAVE_INTERVAL:
            self.save()
            self._saved_at = now
        return learned

    def _record(self, event: LogLogin, now: float) -> bool:
        source = f"log:{event.server}"
        try:
            self.store.add(event.address, event.user, now, self.auth_ttl, source=source)
        except StoreError as exc:
            log.error("login of %s not recorded: %s", event.address, exc)
            return False
        self.logins += 1
        if event.session is not None:
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[event.session] = _Session(event.address, event.user, source, now, now)
        return True

    def _renew(self, now: float) -> None:
        for key, session in list(self.sessions.items()):
            if now - session.started > SESSION_MAX:
                del self.sessions[key]
            elif now - session.renewed >= self.auth_ttl / 2:
                try:
                    self.store.add(session.address, session.user, now, self.auth_ttl,
                                   source=session.source)
                except StoreError as exc:
                    log.error("login of %s not renewed: %s", session.address, exc)
                    continue
                session.renewed = now


def _pair(value: object) -> tuple[int, int, str] | None:
    if (isinstance(value, list) and len(value) == 3 and isinstance(value[2], str)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value[:2])):
        return value[0], value[1], value[2]
    return None
