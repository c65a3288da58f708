"""Refusing one recipient in place, the transaction kept, no error counted.

A RCPT the table fails goes on to the MTA overwritten, byte for byte and
line ending kept, with a command the MTA answers without taking a recipient
and without counting an error against the client. The MTA's reply to it,
found in order like every reply, is overwritten the same way with the
form's text, so the client reads a `550` telling the user to log in for
that recipient, and the others' replies as sent.

Every MTA counts something (docs/mta-error-budgets.md), so the command is
chosen per MTA (`FORMS`):

- Postfix: `NOOP ...`, answered `250 2.0.0 Ok`; it counts only against
  `smtpd_junk_command_limit` (100 a session). Its reply is twelve octets,
  so the client reads the short `SHORT_REPLY`.
- Sendmail: `HELP ...`, answered `504 5.3.0 HELP topic "..." unknown` (or
  its help text, or `502` without a help file); Sendmail counts NOOP and
  unknown commands, not HELP.
- Exim: `RCPT TO:...` with an address of no domain, answered `501 ...:
  recipient address must contain a domain`; Exim counts unknown commands,
  syntax errors and non-mail commands (NOOP and HELP among them), not
  this refusal.
- any other MTA, or one not told apart: a verb no MTA implements, answered
  `500`, as every MTA counts an unknown command.

`Recognizer` tells the MTA from the first lines it sends: a greeting that
names it, or the shape of the first line of its EHLO reply; the config key
`mta` can name it instead. A session refuses each recipient with the form
known when that recipient is refused.

Sequence numbers never move: only bytes are replaced, never added or
removed. Every replacement is a function of a byte's position and the
byte itself, so a retransmission, a reply split over segments at any byte,
and a multiline reply are rewritten identically. The rewrites are kept as
(stream offset, bytes) and laid over every segment that covers them,
retransmissions included; the streams keep what each side really sent, so
first-seen-wins keeps comparing the client's bytes with the client's.

Where the command line began in an earlier segment (its start already went
to the MTA as sent), or the MTA accepts a rewritten command that could have
named a recipient, the engine falls back to refusing the session.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from .events import Answered, RcptTo

#: what a refused recipient's reply reads; a longer MTA reply is padded with
#: spaces, a shorter one cut (Postfix's 500 is exactly this long)
REPLY = b"550 5.7.1 Relaying denied: log in first"
#: the same in Postfix's answer to NOOP, `250 2.0.0 Ok`: twelve octets
SHORT_REPLY = b"550 Log in."

# A word of letters and hyphens: Postfix disconnects on a command that does
# not start with a letter (smtpd_forbidden_commands), an unknown verb is
# refused before any argument is read, and Exim reads it as a local part.
_VERB = b"XSAPD-REFUSED-RECIPIENT"
_LF, _CR, _DASH = 0x0A, 0x0D, 0x2D


class MTA(enum.Enum):
    """The MTAs whose error budgets the refusal knows (the config key `mta`)."""

    POSTFIX = "postfix"
    SENDMAIL = "sendmail"
    EXIM = "exim"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Form:
    """What a refused RCPT line becomes for one MTA, and what the client
    reads instead of the MTA's answer to it."""

    head: bytes      # the line starts so; `_VERB` and X fill it to its length
    text: bytes
    must_fail: bool  # the MTA could read a recipient in it: only a 4xx or 5xx is safe

    def command(self, length: int) -> bytes:
        """What the MTA reads instead of a refused RCPT line of `length` bytes
        (at least 9, `RCPT TO:x`, so every form's head fits)."""
        line = self.head + _VERB
        return line[:length] if length <= len(line) else line + b"X" * (length - len(line))

    def refused(self, code: str) -> bool:
        """Whether the MTA's final reply `code` to the command leaves the
        transaction without a new recipient."""
        return not self.must_fail or code[:1] in ("4", "5")


FORMS: dict[MTA, Form] = {
    MTA.POSTFIX: Form(b"NOOP ", SHORT_REPLY, must_fail=False),
    MTA.SENDMAIL: Form(b"HELP ", REPLY, must_fail=False),
    MTA.EXIM: Form(b"RCPT TO:", REPLY, must_fail=True),   # a local part, no domain
    MTA.OTHER: Form(b"", REPLY, must_fail=True),          # an unknown verb
}

_NAMED = re.compile(rb"\b(postfix|sendmail|exim)\b", re.IGNORECASE)
SNIFF_LIMIT = 1024  # server octets read for the greeting and the EHLO reply's first line
_NO_NAMES: frozenset[bytes] = frozenset()  # shared by every Recognizer that has none


class Recognizer:
    """Tells the MTA from the first lines of the server stream.

    A greeting (`220`, all its lines) that names exactly one of the MTAs
    tells it. Otherwise the first line of the next reply does, if it is the
    `250` of an EHLO or HELO: `host ... pleased to meet you` is Sendmail,
    `host Hello ...` is Exim, a lone host name is Postfix. Anything else, or
    nothing within `SNIFF_LIMIT` octets, is MTA.OTHER.
    """

    __slots__ = ("mta", "_line", "_read", "_names", "_greeted")

    def __init__(self) -> None:
        # Immutable while sniffing, so that a told session keeps no buffers of
        # its own (the empty ones are shared): a flow's memory.
        self.mta: MTA | None = None  # None: not told yet
        self._line = b""             # the line under way
        self._read = 0
        self._names = _NO_NAMES
        self._greeted = False

    def feed(self, data: bytes) -> None:
        """The next server bytes."""
        if self.mta is not None:
            return
        data = data[:SNIFF_LIMIT - self._read]
        self._read += len(data)
        *lines, rest = data.split(b"\n")
        for line in lines:
            told = self._judge((self._line + line).rstrip(b"\r"))
            self._line = b""
            if told is not None:
                self._decide(told)
                return
        self._line += rest
        if self._read >= SNIFF_LIMIT:
            self._decide(MTA.OTHER)

    def _judge(self, line: bytes) -> MTA | None:
        """The MTA a whole server line tells, or None: read on."""
        if not self._greeted:
            if not line.startswith(b"220"):
                return MTA.OTHER
            self._names |= {name.lower() for name in _NAMED.findall(line)}
            if line[3:4] != b"-":
                self._greeted = True
                if len(self._names) == 1:
                    return MTA(next(iter(self._names)).decode())
            return None
        words = line[4:].split() if line[:3] == b"250" else []
        if line.lower().endswith(b"pleased to meet you"):
            return MTA.SENDMAIL
        if len(words) >= 2 and words[1].lower() == b"hello":
            return MTA.EXIM
        if len(words) == 1:
            return MTA.POSTFIX
        return MTA.OTHER

    def _decide(self, mta: MTA) -> None:
        self.mta = mta
        self._line = b""
        self._names = _NO_NAMES


def reply(original: bytes, column: int, text: bytes) -> tuple[bytes, int]:
    """The client's view of reply bytes `original`, the first of which is at
    `column` of its line, overwritten with `text`; returns it and the column
    after it.

    Line endings stay where the MTA put them, and so does the `-` of a
    continued line, so a multiline reply stays one (every line `550`).
    """
    out = bytearray(len(original))
    for i, byte in enumerate(original):
        if byte == _LF:
            out[i], column = byte, 0
            continue
        if byte == _CR or (column == 3 and byte == _DASH):
            out[i] = byte
        else:
            out[i] = text[column] if column < len(text) else 0x20
        column += 1
    return bytes(out), column


class Refusals:
    """One session's refused recipients: the stream bytes to overwrite."""

    __slots__ = ("client", "server", "_forms", "_column")

    def __init__(self) -> None:
        #: (client-stream offset, bytes the MTA reads there)
        self.client: list[tuple[int, bytes]] = []
        #: (server-stream offset, bytes the client reads there)
        self.server: list[tuple[int, bytes]] = []
        self._forms: dict[int, Form] = {}  # refused commands not yet fully answered
        self._column = 0                   # in the reply under way, if it is one of them

    def refuse(self, event: RcptTo, form: Form) -> None:
        self.client.append((event.offset, form.command(event.length)))
        self._forms[event.number] = form

    def replies(self, data: bytes, start: int, answered: list[Answered],
                under_way: tuple[int, int] | None) -> bool:
        """Rewrite what of the new server bytes `data` (at stream offset
        `start`) answers a refused command. False if the MTA may have taken
        a recipient from one."""
        end = start + len(data)
        spans = []
        for event in answered:
            form = self._forms.pop(event.number, None)
            if form is not None:
                if not form.refused(event.code):
                    return False
                spans.append((event.start, event.end, form.text, False))
        if under_way is not None and (form := self._forms.get(under_way[0])) is not None:
            spans.append((under_way[1], end, form.text, True))
        for first, last, text, open_ in spans:
            lo, hi = max(first, start), min(last, end)
            if lo >= hi:
                continue
            # a reply begun in an earlier segment goes on at the column it reached
            column = self._column if first < start else 0
            rewritten, column = reply(data[lo - start:hi - start], column, text)
            self.server.append((lo, rewritten))
            self._column = column if open_ else 0
        return True

    def forget(self, client_base: int, server_base: int) -> None:
        """Drop rewrites wholly before what each receiver acknowledged: a
        resend of those bytes is discarded by the receiver's TCP."""
        if self.client and self.client[0][0] + len(self.client[0][1]) <= client_base:
            self.client = [r for r in self.client if r[0] + len(r[1]) > client_base]
        if self.server and self.server[0][0] + len(self.server[0][1]) <= server_base:
            self.server = [r for r in self.server if r[0] + len(r[1]) > server_base]
