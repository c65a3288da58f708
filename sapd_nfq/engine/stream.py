"""One direction of a TCP connection, normalised: what the receiver will read.

A Stream hands each byte of its direction to the inspector exactly once, in
order (`NEW`), and keeps the bytes the receiver has not acknowledged yet so
that a retransmission can be compared with what was inspected. First seen
wins: a retransmission that disagrees with an inspected byte is `CONFLICT`,
an attack (Suricata's lesson), and the caller resets the flow.

Why that is enough: the receiver's TCP can only deliver a byte that arrived
in some segment, and every segment passes through here. Data beyond a gap is
never accepted (`GAP`: the caller drops it, the sender retransmits), so the
receiver cannot read a byte we have not inspected. Where we accepted bytes
the receiver discarded (bad ACK, PAWS, a low TTL), the sender must send that
range again before the receiver can go on, and the resend is compared: the
two views agree byte for byte, or the flow ends in CONFLICT. Bytes the
receiver acknowledged are dropped (`acked`); a resend of those is discarded
by the receiver's TCP, so it cannot be compared and need not be.

Sequence numbers are mod 2**32; stream offsets (0 = first byte after the
SYN) are unbounded ints. Memory is bounded by `max_unacked` retained bytes:
a segment that would exceed it is `OVERFLOW` (the caller drops it, which
throttles the sender to that many bytes in flight).
"""

from __future__ import annotations

import enum

_MASK = 0xFFFFFFFF
_HALF = 0x80000000


class Outcome(enum.Enum):
    """What a segment did to the stream, and so what the caller does with it."""

    #: the stream advanced: new bytes (possibly none, when the segment only
    #: carried the FIN or SYN) to inspect, then forward the segment
    NEW = "new"
    #: nothing new to inspect (a resend of inspected bytes, a pure ACK, a
    #: RST): forward it
    DUPLICATE = "duplicate"
    #: starts beyond the next expected byte: drop, the sender retransmits
    GAP = "gap"
    #: contradicts inspected bytes or the stream's end: hostile, reset
    CONFLICT = "conflict"
    #: would retain more than max_unacked bytes: drop, the sender retries
    OVERFLOW = "overflow"


def seq_diff(a: int, b: int) -> int:
    """a - b in sequence space, as a signed distance in [-2**31, 2**31)."""
    return ((a - b + _HALF) & _MASK) - _HALF


#: per stream: what Linux lets a receiver advertise by default (tcp_rmem max
#: is 6 MB); a sender with a larger window in flight is throttled by drops
MAX_UNACKED = 4 * 1024 * 1024


class RetainBudget:
    """Bytes all streams of one flow table may retain together.

    A bulk upload keeps as many bytes unacknowledged as the queue holds
    before the server's ACKs come back through it, so each stream may retain
    megabytes; the budget bounds the sum over every flow at once.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Stream:
    """The bytes one side sent, from its SYN's `isn` on.

    `offset` counts the bytes delivered so far; `fin` says the sender's FIN
    was accepted (it sits at `offset`, which then never grows again).
    `added` is how far the latest receive() moved next_seq (0 unless NEW):
    next_seq - added is where the stream stood before that segment.
    """

    __slots__ = ("isn", "max_unacked", "budget", "offset", "fin", "added", "_base", "_buf",
                 "_start", "_ask_at")

    def __init__(self, isn: int, max_unacked: int = MAX_UNACKED,
                 budget: RetainBudget | None = None) -> None:
        self.isn = isn
        self.max_unacked = max_unacked
        self.budget = budget
        self.offset = 0
        self.fin = False
        self.added = 0
        self._base = 0              # stream offset of the first retained byte
        #: retained bytes from _buf[_start] on; none: the shared b"" (an idle
        #: stream holds no buffer object)
        self._buf: bytes | bytearray = b""
        self._start = 0
        self._ask_at = 0            # stream offset from which wants_ack() may say yes again

    @property
    def next_seq(self) -> int:
        """The sequence number after everything accepted (FIN included)."""
        return (self.isn + 1 + self.offset + self.fin) & _MASK

    @property
    def retained(self) -> int:
        """Bytes kept for comparison (delivered, not yet acknowledged)."""
        return self.offset - self._base

    def receive(self, seq: int, payload: bytes, fin: bool = False) -> tuple[Outcome, bytes]:
        """Judge a segment of this direction; NEW comes with the new bytes."""
        self.added = 0
        if not payload and not fin:
            return Outcome.DUPLICATE, b""
        offset = self.offset
        start = offset + seq_diff(seq, (self.isn + 1 + offset) & _MASK)
        end = start + len(payload)
        if self.fin:
            if end > offset or (fin and end != offset):
                return Outcome.CONFLICT, b""
        elif start > offset:
            return Outcome.GAP, b""
        elif fin and end < offset:
            return Outcome.CONFLICT, b""

        lo, hi = max(start, self._base), min(end, offset)
        if lo < hi:
            at = self._start - self._base
            if self._buf[at + lo:at + hi] != payload[lo - start:hi - start]:
                return Outcome.CONFLICT, b""
        if end <= offset and (self.fin or not fin):
            return Outcome.DUPLICATE, b""

        if end - self._base > self.max_unacked:
            return Outcome.OVERFLOW, b""
        new = payload[offset - start:] if end > offset else b""
        budget = self.budget
        if budget is not None and new:
            if budget.used + len(new) > budget.limit:
                return Outcome.OVERFLOW, b""
            budget.used += len(new)
        if new:
            buf = self._buf
            if not isinstance(buf, bytearray):
                self._buf = bytearray(new)
            else:
                if self._start and self._start * 2 > len(buf):
                    del buf[:self._start]
                    self._start = 0
                buf += new
            self.offset = end
        self.added = len(new) + (fin and not self.fin)
        if fin:
            self.fin = True
        return Outcome.NEW, new

    def wants_ack(self) -> bool:
        """Whether to ask the receiver how far it got: the bytes kept have
        passed half their limit, and the stream moved an eighth of it since
        it last asked.

        Only ACKs free kept bytes, and the rules let most pure ACKs by the
        queue (one in 16 reaches it). A receiver of 64 KB super-packets sends
        few, so the bytes kept could reach the limit; the sender's next
        segment would be dropped, and after its last ACK went by no other
        would come to free them: the stream would hold still for good.
        """
        if 2 * self.retained < self.max_unacked or self.offset < self._ask_at:
            return False
        self._ask_at = self.offset + self.max_unacked // 8
        return True

    def byte_before(self, new: int) -> tuple[int, bytes] | None:
        """(seq, byte) of the last byte delivered before the `new` latest
        ones, if it is still kept."""
        at = self.offset - new - 1
        if at < self._base:
            return None
        index = self._start + at - self._base
        return (self.isn + 1 + at) & _MASK, bytes(self._buf[index:index + 1])

    def offset_of(self, seq: int) -> int:
        """The stream offset of the byte at sequence number `seq` (near the
        stream's end: within 2**31 of it)."""
        return self.offset + seq_diff(seq, (self.isn + 1 + self.offset) & _MASK)

    def acks_sent(self, ack: int) -> bool:
        """Whether `ack` lies between the first retained byte and next_seq."""
        sent = self.offset - self._base + self.fin
        return 0 <= seq_diff(ack, (self.isn + 1 + self._base) & _MASK) <= sent

    def acked(self, ack: int) -> None:
        """The receiver acknowledged up to `ack`: forget the bytes before it.

        Acks outside what was sent (stale, or for unsent data) are ignored.
        """
        if not self.acks_sent(ack):
            return
        drop = min(seq_diff(ack, (self.isn + 1 + self._base) & _MASK), self.retained)
        if not drop:
            return
        self._base += drop
        self._start += drop
        if self.budget is not None:
            self.budget.used -= drop
        if self._start == len(self._buf):
            self._buf = b""
            self._start = 0

    def release(self) -> None:
        """Forget every retained byte (the flow is gone or no longer compared)."""
        if self.budget is not None:
            self.budget.used -= self.retained
        self._base = self.offset
        self._buf = b""
        self._start = 0
