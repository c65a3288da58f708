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

The systemd journal ("journal" in `login_logs`) is read through
`journalctl --follow --output=json`, a child whose output is a non-blocking
pipe: only the entries journald's own fields show Dovecot wrote count
(engine/loglines.py), so `logger -t dovecot` opens nothing. The cursor of the
last entry read is the position kept across restarts. A journalctl that exits
is started again after RESTART_INTERVAL, from that cursor.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..engine.logins import LoginStore, StoreError
from ..engine.loglines import (
    JOURNAL,
    JOURNAL_EXES,
    JOURNAL_UNITS,
    MAX_JOURNAL_ENTRY,
    MAX_LINE,
    LogLogin,
    LogSessionEnd,
    journal_entry,
    parse_line,
)
from ..wiring.logsetup import LOGGER

READ_BUDGET = 256 * 1024  # bytes a poll reads from one file
SESSION_MAX = 24 * 3600.0  # seconds a session's login is renewed without its end being seen
MAX_SESSIONS = 65536
SAVE_INTERVAL = 10.0  # seconds between saves of the positions while lines come in
STATE_NAME = "login-logs.json"
RESTART_INTERVAL = 5.0  # seconds before a journalctl that exited is started again
STOP_TIMEOUT = 1.0  # seconds journalctl gets to exit on SIGTERM before SIGKILL
STDERR_TAIL = 512  # octets of journalctl's error output kept for the log
HEAD = 256  # bytes of a file's start kept to recognise it after a restart

log = logging.getLogger(LOGGER)


class LineSplitter:
    """Complete lines out of a byte stream; a line longer than `limit` is dropped whole."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.done = 0  # octets of the stream in lines returned or dropped
        self.partial = b""
        self._skipping = False  # inside a line too long to read

    def reset(self) -> None:
        self.done, self.partial, self._skipping = 0, b"", False

    def feed(self, data: bytes, lines: list[bytes]) -> None:
        chunks = (self.partial + data).split(b"\n")
        self.partial = chunks.pop()
        for chunk in chunks:
            self.done += len(chunk) + 1
            if self._skipping:
                self._skipping = False  # the end of a line too long to read
                continue
            lines.append(chunk.removesuffix(b"\r"))
        if len(self.partial) > self.limit:
            self.done += len(self.partial)
            self.partial, self._skipping = b"", True


class FileFollower:
    """One log file, read line by line from where we left off, across rotation."""

    def __init__(self, path: str | os.PathLike[str], resume: tuple[int, int, str] | None = None
                 ) -> None:
        self.path = os.fspath(path)
        self._resume = resume  # (inode, offset, head) from before a restart
        self._fd: int | None = None
        self._inode = 0
        self._start = 0        # where in the file the splitter's stream begins
        self._lines = LineSplitter(MAX_LINE)
        self._first = True     # the first open starts at the end (or the resumed offset)

    @property
    def _offset(self) -> int:
        """The file offset of the first byte not yet returned in a line."""
        return self._start + self._lines.done

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
        self._start = start
        self._lines.reset()
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
            self._lines.feed(data, lines)
        return lines

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
        elif stat.S_ISREG(st.st_mode) and st.st_size < self._offset + len(self._lines.partial):
            os.lseek(self._fd, 0, os.SEEK_SET)  # copytruncate
            self._start = 0
            self._lines.reset()


class JournalFollower:
    """The journal's Dovecot entries, read from `journalctl --follow --output=json`."""

    def __init__(self, source: str, resume: str | None = None,
                 command: Sequence[str] = ("journalctl",)) -> None:
        self.path = source
        directory = source.partition(":")[2]
        # journalctl's own filter keeps the pipe to Dovecot's entries; journal_entry checks again
        matches = [f"_SYSTEMD_UNIT={unit}" for unit in sorted(JOURNAL_UNITS)]
        matches += ["+", *(f"_EXE={exe}" for exe in sorted(JOURNAL_EXES))]
        self._argv = [*command, "--follow", "--output=json", "--no-pager", "--quiet",
                      *(["--directory", directory] if directory else []), *matches]
        self._cursor = resume
        self._proc: subprocess.Popen[bytes] | None = None
        self._lines = LineSplitter(MAX_JOURNAL_ENTRY)
        self._errors = b""
        self._entries = 0  # read since journalctl last started
        self._next_start = 0.0
        self._stopping: list[tuple[subprocess.Popen[bytes], float]] = []

    @property
    def position(self) -> str | None:
        return self._cursor

    def _start(self) -> bool:
        now = time.monotonic()
        if now < self._next_start:
            return False
        where = [f"--after-cursor={self._cursor}"] if self._cursor else ["--lines=0"]
        try:
            self._proc = subprocess.Popen([*self._argv, *where], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            log.error("cannot run journalctl for login_logs: %s", exc)
            self._next_start = now + RESTART_INTERVAL
            return False
        assert self._proc.stdout is not None and self._proc.stderr is not None
        for pipe in (self._proc.stdout, self._proc.stderr):
            os.set_blocking(pipe.fileno(), False)
        self._lines.reset()
        self._errors, self._entries = b"", 0
        return True

    def read_lines(self, budget: int = READ_BUDGET) -> list[bytes]:
        """The messages of the Dovecot entries journalctl gave since the last call."""
        if self._stopping:
            self._reap()
        if self._proc is None and not self._start():
            return []
        assert self._proc is not None and self._proc.stdout is not None
        self._drain_errors()
        raw: list[bytes] = []
        while budget > 0:
            try:
                data = os.read(self._proc.stdout.fileno(), min(65536, budget))
            except BlockingIOError:
                break
            if not data:
                self._ended()
                break
            budget -= len(data)
            self._lines.feed(data, raw)
        messages = []
        for line in raw:
            entry = journal_entry(line)
            if entry is None:
                continue
            self._entries += 1
            if entry.cursor is not None:
                self._cursor = entry.cursor
            if entry.message is not None:
                messages.append(entry.message)
        return messages

    def _drain_errors(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        try:
            while chunk := os.read(self._proc.stderr.fileno(), 4096):
                self._errors = (self._errors + chunk)[-STDERR_TAIL:]
        except BlockingIOError:
            pass

    def _ended(self) -> None:
        assert self._proc is not None
        self._drain_errors()
        status = self._proc.poll()
        said = self._errors.decode("utf-8", "replace").strip().replace("\n", "; ")
        log.error("journalctl for login_logs %s%s; again in %.0f s",
                  "closed its output" if status is None else f"exited with status {status}",
                  f": {said}" if said else "", RESTART_INTERVAL)
        if self._cursor is not None and self._entries == 0:
            self._cursor = None  # a cursor it cannot seek to: go on from the end
        self.close()
        self._next_start = time.monotonic() + RESTART_INTERVAL

    def close(self) -> None:
        """Stop journalctl without waiting for it: it is reaped by later calls."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        if proc.poll() is None:
            proc.terminate()
            self._stopping.append((proc, time.monotonic() + STOP_TIMEOUT))

    def _reap(self) -> None:
        """Collect the journalctl children told to stop; SIGKILL those past STOP_TIMEOUT."""
        now, stopping = time.monotonic(), []
        for proc, deadline in self._stopping:
            if proc.poll() is None:
                if now >= deadline:
                    proc.kill()
                stopping.append((proc, deadline))
        self._stopping = stopping


Follower = FileFollower | JournalFollower


def follower(source: str | os.PathLike[str], saved: object) -> Follower:
    """The follower for one `login_logs` entry, resumed from its saved position."""
    if isinstance(source, str) and (source == JOURNAL or source.startswith(JOURNAL + ":")):
        return JournalFollower(source, saved if isinstance(saved, str) else None)
    return FileFollower(source, _pair(saved))


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
        self.followers = [follower(p, files.get(os.fspath(p))) for p in paths]
        self.sessions: dict[str, _Session] = {
            key: _Session(**value) for key, value in saved.get("sessions", {}).items()
            if isinstance(value, dict)}
        self.lines = 0
        self.logins = 0
        self._saved_at = 0.0

    # -- state across restarts ------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
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
        files = {f.path: pos if isinstance(pos, str) else list(pos)
                 for f in self.followers if (pos := f.position) is not None}
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
