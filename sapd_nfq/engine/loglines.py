"""Logins read from mail servers' log lines: pure, one line in, a value or None out.

A log learner opens the relay for whatever a success line names, and part of
each line is chosen by the client: the user name, written as it was sent (only
control characters replaced, and shortened). So a line counts only when the
server's own text frames it on both sides:

- before the name: the log's prefix and the server's message, fixed text that
  a name cannot reach ("imap-login: Login: user=<" and nothing else; a failed
  login says "Disconnected (auth failed, ...): user=<" there);
- after the name: the fields the server writes after it, matched up to the end
  of the line, and the address taken from the last of them. A name holding
  ">, method=PLAIN, rip=198.18.6.6, ..." stays inside the name, since the
  server's real fields follow it.

Lines longer than MAX_LINE are never read (the follower drops them whole).

The systemd journal (`journalctl -o json`, one entry a line): an entry counts
only if journald's own fields say Dovecot wrote it (`journal_message`). Fields
whose names start with "_" are set by journald from the writer's credentials
and cannot be sent; SYSLOG_IDENTIFIER can (`logger -t dovecot`), so it is
never looked at. Dovecot's log process (or its master, under systemd) runs
as root: an entry counts if `_UID` is 0 and either `_SYSTEMD_UNIT` is
dovecot.service or `_EXE` is one of Dovecot's binaries.

Servers and formats:
- Dovecot 2.3 and 2.4, pop3-login, imap-login and submission-login, default
  `login_log_format_elements` (the same in both: user, method, rip, lip, mpid,
  TLS or secured, session), written by Dovecot itself to its `log_path`
  ("Dec 02 04:44:31 imap-login: Info: Login: ...") or through syslog or the
  journal ("... dovecot: imap-login: Login: ..."). The end of a session is
  "imap(alice)<mpid><session>: [Info: ]Disconnected: ..." (2.3 and 2.4), or
  "...: Logged out ..." in 2.4's shortened form.
- Courier-IMAP and Courier's POP3 (imapd, imapd-ssl, pop3d, pop3d-ssl):
  "imapd-ssl: LOGIN, user=alice, ip=[::ffff:198.18.1.2], port=[40312],
  protocol=IMAP". Courier is the other server POP-before-SMTP sites still run:
  it is packaged in Debian 12, it is what the qmail- and Courier-MTA-based
  hosting setups (where POP-before-SMTP lives on) ship, and pop-before-smtp's
  users read exactly these lines.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .addresses import normalize_ip

MAX_LINE = 4096
"""Octets in a log line we read; Dovecot shortens a user name to 80 characters."""
JOURNAL = "journal"
"""A `login_logs` entry that names the systemd journal, not a file ("journal:DIR": DIR's)."""
MAX_JOURNAL_ENTRY = 16384
"""Octets of a journal entry in JSON: its message (at most MAX_LINE) and journald's fields."""
JOURNAL_UNITS = frozenset({"dovecot.service"})
JOURNAL_EXES = frozenset({"/usr/lib/dovecot/log", "/usr/sbin/dovecot"})

# Timestamps: Dovecot's log_path default and classic syslog ("Dec  2 04:44:31"),
# RFC 3339 (rsyslog's high-precision format); then an optional host name and the
# program: "dovecot: ", "dovecot[123]: " (syslog), or none (Dovecot's own file).
_PREFIX = (rb"^(?:(?:[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d|\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:\d\d))"
           rb"(?: [A-Za-z0-9.-]+)? )?")
_IP = rb"[0-9A-Fa-f:.]+"

_DOVECOT_LOGIN = re.compile(
    _PREFIX + rb"(?:dovecot(?:\[\d+\])?: )?(?P<service>pop3|imap|submission)-login: "
    rb"(?:Info: )?Login: user=<(?P<user>.*)>, method=(?P<method>[A-Za-z0-9_-]+), "
    rb"rip=(?P<rip>" + _IP + rb"), lip=(?P<lip>" + _IP + rb")(?:, mpid=(?P<mpid>\d+))?"
    rb"(?P<tls>, (?:TLS|secured))?(?:, session=<(?P<session>[A-Za-z0-9+/]+)>)?$")
_DOVECOT_END = re.compile(
    _PREFIX + rb"(?:dovecot(?:\[\d+\])?: )?(?P<service>pop3|imap|submission)\(.*\)"
    rb"<(?P<mpid>\d+)><(?P<session>[A-Za-z0-9+/]+)>: (?:Info: )?"
    rb"(?:Disconnected|Logged out|Connection closed)\b")
_COURIER_LOGIN = re.compile(
    _PREFIX + rb"(?P<service>imapd|imapd-ssl|pop3d|pop3d-ssl)(?:\[\d+\])?: LOGIN, "
    rb"user=(?P<user>.*), ip=\[(?P<rip>" + _IP + rb")\], port=\[\d+\]"
    rb"(?:, protocol=(?P<protocol>[A-Z0-9]+))?$")


@dataclass(frozen=True, slots=True)
class LogLogin:
    """A successful login a server logged: `address` logged in as `user`."""

    server: str           # "dovecot", "courier"
    service: str          # "imap", "pop3", "submission"
    address: str
    user: str | None
    method: str | None = None
    tls: bool = False
    session: str | None = None  # Dovecot's session id: its end is logged too


@dataclass(frozen=True, slots=True)
class LogSessionEnd:
    """A Dovecot mail session ended (logout, disconnect)."""

    service: str
    session: str


def _user(raw: bytes) -> str | None:
    return raw.decode("utf-8", "replace") or None


def _address(raw: bytes) -> str | None:
    try:
        return normalize_ip(raw.decode("ascii"))  # IPv4-mapped becomes IPv4
    except ValueError:
        return None


def parse_line(line: bytes) -> LogLogin | LogSessionEnd | None:
    """What one log line (without its line ending) says about logins, if anything."""
    if len(line) > MAX_LINE or b"\n" in line or b"\r" in line:
        return None
    if b"Login: user=<" in line:
        m = _DOVECOT_LOGIN.match(line)
        if m is None or (address := _address(m["rip"])) is None:
            return None
        session = m["session"].decode("ascii") if m["session"] else None
        return LogLogin("dovecot", m["service"].decode("ascii"), address, _user(m["user"]),
                        m["method"].decode("ascii"), bool(m["tls"]), session)
    if b": LOGIN, user=" in line:
        m = _COURIER_LOGIN.match(line)
        if m is None or (address := _address(m["rip"])) is None:
            return None
        service = m["service"].decode("ascii")
        return LogLogin("courier", service.removesuffix("-ssl").removesuffix("d"), address,
                        _user(m["user"]), None, service.endswith("-ssl"))
    m = _DOVECOT_END.match(line)
    if m is not None:
        return LogSessionEnd(m["service"].decode("ascii"), m["session"].decode("ascii"))
    return None


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal entry: where it is (to resume after), and its message if Dovecot wrote it."""

    cursor: str | None
    message: bytes | None


def journal_entry(entry: bytes) -> JournalEntry | None:
    """One line of `journalctl -o json`; None if it is not an entry."""
    if len(entry) > MAX_JOURNAL_ENTRY:
        return None
    try:
        fields = json.loads(entry)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    cursor = fields.get("__CURSOR")
    return JournalEntry(cursor if isinstance(cursor, str) else None, _dovecot_message(fields))


def _dovecot_message(fields: dict[str, object]) -> bytes | None:
    if fields.get("_UID") != "0":
        return None
    unit, exe = fields.get("_SYSTEMD_UNIT"), fields.get("_EXE")
    # a field sent twice comes as a list: never Dovecot's
    if not (isinstance(unit, str) and unit in JOURNAL_UNITS
            or isinstance(exe, str) and exe in JOURNAL_EXES):
        return None
    message = fields.get("MESSAGE")
    if isinstance(message, str):
        return message.encode("utf-8")
    # journald gives a message that is not UTF-8 as its octets
    if isinstance(message, list) and all(isinstance(o, int) and 0 <= o < 256 for o in message):
        return bytes(message)
    return None
