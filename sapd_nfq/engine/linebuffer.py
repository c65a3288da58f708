"""A receive buffer for line-based protocols, bounded and linear-time.

Lines end at LF, with or without a CR before it: that is how Postfix,
Sendmail and Dovecot split commands, so it is how we must split them too (a
parser that waited for CRLF would let `RCPT TO:<x>\\n` past uninspected).

Every method does work proportional to the bytes it consumes, so a peer that
drips a line one byte at a time cannot make parsing quadratic.
"""

from __future__ import annotations

from .errors import ProtocolError


class LineBuffer:
    """Bytes of one direction of a stream, consumed as lines or byte counts.

    `offset` is the stream offset of the first unconsumed byte.
    """

    __slots__ = ("_buf", "_start", "_scan", "offset", "max_line")

    def __init__(self, max_line: int) -> None:
        # empty: the shared b"" (an idle connection holds no buffer object)
        self._buf: bytes | bytearray = b""
        self._start = 0  # first unconsumed byte in _buf
        self._scan = 0   # bytes before this index (from _start) hold no LF
        self.offset = 0
        self.max_line = max_line

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def feed(self, data: bytes) -> None:
        buf = self._buf
        if not isinstance(buf, bytearray):
            self._buf = bytearray(data)
            return
        if self._start and self._start * 2 > len(buf):
            del buf[: self._start]
            self._start = 0
        buf += data

    def next_line(self) -> bytes | None:
        """The next complete line without its line ending, or None.

        Raises ProtocolError when a line grows past `max_line` without an LF.
        """
        pos = self._buf.find(b"\n", self._start + self._scan)
        if pos < 0:
            pending = len(self._buf) - self._start
            if pending > self.max_line + 1:  # + 1: a CR may still precede the LF
                raise ProtocolError(f"line longer than {self.max_line} octets")
            self._scan = pending
            return None
        end = pos
        if end > self._start and self._buf[end - 1] == 0x0D:
            end -= 1
        if end - self._start > self.max_line:
            raise ProtocolError(f"line longer than {self.max_line} octets")
        line = bytes(self._buf[self._start:end])
        self._consume_to(pos + 1)
        return line

    def take(self, n: int) -> int:
        """Consume up to n bytes unseen (a BDAT chunk); returns how many."""
        n = min(n, len(self))
        self._consume_to(self._start + n)
        return n

    def read(self, n: int) -> bytes:
        """Consume and return up to n bytes (an IMAP literal's content)."""
        n = min(n, len(self))
        data = bytes(self._buf[self._start:self._start + n])
        self._consume_to(self._start + n)
        return data

    def take_all(self) -> bytes:
        data = bytes(self._buf[self._start:])
        self._consume_to(len(self._buf))
        return data

    def _consume_to(self, index: int) -> None:
        self.offset += index - self._start
        self._scan = 0
        if index == len(self._buf):
            # All read: free the storage (an idle connection holds no buffer).
            self._buf = b""
            self._start = 0
        else:
            self._start = index
