"""Refusing one recipient in place, the transaction kept.

A RCPT the table fails goes on to the MTA overwritten, byte for byte and
line ending kept, with `command()`: a verb no MTA implements, so the MTA
answers it with a permanent error (Postfix `500 5.5.2 Error: command not
recognized`, Sendmail `500 5.5.1 Command unrecognized: "..."`), keeps the
transaction, and has no address to deliver to. The MTA's reply to it, found
in order like every reply, is overwritten the same way with `REPLY`, so the
client reads `550 5.7.1` for that recipient and the others' replies as sent.

Sequence numbers never move: only bytes are replaced, never added or
removed. Every replacement is a function of a byte's position and the
byte itself, so a retransmission, a reply split over segments at any byte,
and a multiline reply are rewritten identically. The rewrites are kept as
(stream offset, bytes) and laid over every segment that covers them,
retransmissions included; the streams keep what each side really sent, so
first-seen-wins keeps comparing the client's bytes with the client's.

Where the command line began in an earlier segment (its start already went
to the MTA as sent), or the MTA accepts the rewritten command, the engine
falls back to refusing the session.
"""

from __future__ import annotations

from .events import Answered, RcptTo

#: what a refused recipient's reply reads; a longer MTA reply is padded with
#: spaces, a shorter one cut (Postfix's 500 is exactly this long)
REPLY = b"550 5.7.1 Relaying denied: log in first"

# A word of letters and hyphens: Postfix disconnects on a command that does
# not start with a letter (smtpd_forbidden_commands), and an unknown verb is
# refused before any argument is read.
_VERB = b"XSAPD-REFUSED-RECIPIENT"
_LF, _CR, _DASH = 0x0A, 0x0D, 0x2D


def command(length: int) -> bytes:
    """What the MTA reads instead of a refused RCPT line of `length` bytes."""
    if length <= len(_VERB):
        return _VERB[:length]
    return _VERB + b"X" * (length - len(_VERB))


def reply(original: bytes, column: int) -> tuple[bytes, int]:
    """The client's view of reply bytes `original`, the first of which is at
    `column` of its line; returns it and the column after it.

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
            out[i] = REPLY[column] if column < len(REPLY) else 0x20
        column += 1
    return bytes(out), column


def refusable(code: str) -> bool:
    """Whether the MTA's reply to the rewritten command refused it."""
    return code[:1] in ("4", "5")


class Refusals:
    """One session's refused recipients: the stream bytes to overwrite."""

    __slots__ = ("client", "server", "_numbers", "_column")

    def __init__(self) -> None:
        #: (client-stream offset, bytes the MTA reads there)
        self.client: list[tuple[int, bytes]] = []
        #: (server-stream offset, bytes the client reads there)
        self.server: list[tuple[int, bytes]] = []
        self._numbers: set[int] = set()  # refused commands not yet fully answered
        self._column = 0                 # in the reply under way, if it is one of them

    def refuse(self, event: RcptTo) -> None:
        self.client.append((event.offset, command(event.length)))
        self._numbers.add(event.number)

    def replies(self, data: bytes, start: int, answered: list[Answered],
                under_way: tuple[int, int] | None) -> bool:
        """Rewrite what of the new server bytes `data` (at stream offset
        `start`) answers a refused command. False if the MTA accepted one."""
        end = start + len(data)
        spans = []
        for event in answered:
            if event.number in self._numbers:
                self._numbers.discard(event.number)
                if not refusable(event.code):
                    return False
                spans.append((event.start, event.end, False))
        if under_way is not None and under_way[0] in self._numbers:
            spans.append((under_way[1], end, True))
        for first, last, open_ in spans:
            lo, hi = max(first, start), min(last, end)
            if lo >= hi:
                continue
            # a reply begun in an earlier segment goes on at the column it reached
            column = self._column if first < start else 0
            text, column = reply(data[lo - start:hi - start], column)
            self.server.append((lo, text))
            self._column = column if open_ else 0
        return True

    def forget(self, client_base: int, server_base: int) -> None:
        """Drop rewrites wholly before what each receiver acknowledged: a
        resend of those bytes is discarded by the receiver's TCP."""
        if self.client and self.client[0][0] + len(self.client[0][1]) <= client_base:
            self.client = [r for r in self.client if r[0] + len(r[1]) > client_base]
        if self.server and self.server[0][0] + len(self.server[0][1]) <= server_base:
            self.server = [r for r in self.server if r[0] + len(r[1]) > server_base]
