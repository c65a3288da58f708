from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from streams import splits

from sapd_nfq.engine.stream import Outcome, Stream, seq_diff

MASK = 0xFFFFFFFF
NEW, DUPLICATE, GAP, CONFLICT, OVERFLOW = (
    Outcome.NEW, Outcome.DUPLICATE, Outcome.GAP, Outcome.CONFLICT, Outcome.OVERFLOW)

DIALOG = b"EHLO client.example\r\nMAIL FROM:<a@local.example>\r\nRCPT TO:<b@remote.example>\r\n"


class Sender:
    """Feeds a Stream the way the sender of `data` would number it."""

    def __init__(self, isn: int = 1000, max_unacked: int = 262144) -> None:
        self.isn = isn
        self.stream = Stream(isn, max_unacked)

    def seq(self, offset: int) -> int:
        return (self.isn + 1 + offset) & MASK

    def send(self, offset: int, data: bytes, fin: bool = False) -> tuple[Outcome, bytes]:
        return self.stream.receive(self.seq(offset), data, fin)

    def ack(self, offset: int, fin: bool = False) -> None:
        self.stream.acked((self.seq(offset) + fin) & MASK)


def test_seq_diff_is_signed_and_wraps() -> None:
    assert seq_diff(5, 3) == 2 and seq_diff(3, 5) == -2
    assert seq_diff(1, MASK) == 2 and seq_diff(MASK, 1) == -2
    assert seq_diff(0x80000000, 0) == -0x80000000


@pytest.mark.parametrize("isn", [0, 1000, MASK - 20, MASK], ids=["zero", "small", "wraps", "max"])
def test_every_split_delivers_the_bytes_once_in_order(isn: int) -> None:
    for chunks in splits(DIALOG):
        s = Sender(isn)
        got, offset = bytearray(), 0
        for chunk in chunks:
            assert s.send(offset, chunk) == (NEW, chunk)
            got += chunk
            offset += len(chunk)
        assert bytes(got) == DIALOG
        assert s.stream.offset == len(DIALOG)
        assert s.stream.next_seq == s.seq(len(DIALOG))


def test_identical_retransmissions() -> None:
    s = Sender()
    s.send(0, b"MAIL FROM:<a@b>\r\n")
    assert s.send(0, b"MAIL FROM:<a@b>\r\n") == (DUPLICATE, b"")
    assert s.send(5, b"FROM") == (DUPLICATE, b"")
    # an identical overlap that also carries new bytes delivers only those
    assert s.send(10, b"<a@b>\r\nRCPT") == (NEW, b"RCPT")
    assert s.stream.offset == 21


def test_conflicting_retransmission_changes_nothing() -> None:
    s = Sender()
    s.send(0, b"RCPT TO:<a@local>\r\n")
    assert s.send(0, b"RCPT TO:<a@evil.>\r\n") == (CONFLICT, b"")
    assert s.send(9, b"x@local>\r\nQUIT\r\n") == (CONFLICT, b"")  # new bytes don't excuse it
    assert s.stream.offset == 19
    assert s.send(19, b"QUIT\r\n") == (NEW, b"QUIT\r\n")


def test_added_is_how_far_the_latest_segment_moved_the_stream() -> None:
    s = Sender()
    s.send(0, b"MAIL FROM:<a@b>\r\n")
    assert s.stream.added == 17
    s.send(10, b"<a@b>\r\nRCPT")          # overlapping: only the new bytes count
    assert s.stream.added == 4
    for offset, data in ((0, b"MAIL"), (0, b"XXXX"), (99, b"gap")):  # duplicate, conflict, gap
        s.send(offset, data)
        assert s.stream.added == 0
    s.send(21, b" TO:<c@d>\r\n", fin=True)  # the FIN takes a sequence number too
    assert s.stream.added == 12 and s.stream.next_seq - s.stream.added == s.seq(21)


@pytest.mark.parametrize("isn", [1000, MASK - 3], ids=["small", "wraps"])
def test_offset_of_a_sequence_number(isn: int) -> None:
    s = Sender(isn)
    s.send(0, b"MAIL FROM:<a@b>\r\n")
    for offset in (0, 5, 17, 30):
        assert s.stream.offset_of(s.seq(offset)) == offset


def test_gap_is_dropped_not_buffered() -> None:
    s = Sender()
    assert s.send(0, b"AB") == (NEW, b"AB")
    assert s.send(3, b"DE") == (GAP, b"")
    assert s.stream.offset == 2 and s.stream.retained == 2
    assert s.send(2, b"C") == (NEW, b"C")
    assert s.send(3, b"DE") == (NEW, b"DE")  # the sender's retransmission


def test_bytes_before_the_syn_are_old() -> None:
    s = Sender()
    # a segment at the SYN's own seq: its first byte is before the stream
    assert s.send(-1, b"?HELO") == (NEW, b"HELO")
    assert s.send(-1, b"!HELO x") == (NEW, b" x")


def test_empty_segments_carry_nothing() -> None:
    s = Sender()
    assert s.send(0, b"") == (DUPLICATE, b"")
    assert s.send(1000, b"") == (DUPLICATE, b"")  # a pure ACK ahead of what we saw


def test_wraparound() -> None:
    s = Sender(isn=MASK - 3)
    assert s.seq(0) == MASK - 2
    data = b"0123456789"
    assert s.send(0, data[:2]) == (NEW, b"01")
    assert s.send(2, data[2:6]) == (NEW, b"2345")  # seqs MASK, 0, 1, 2
    assert s.send(1, b"1234") == (DUPLICATE, b"")
    assert s.send(1, b"1X34") == (CONFLICT, b"")
    assert s.send(6, data[6:]) == (NEW, b"6789")
    assert s.stream.next_seq == (MASK - 2 + 10) & MASK == 7
    s.ack(8)
    assert s.stream.retained == 2


# --- FIN ------------------------------------------------------------------------

def test_fin_after_data() -> None:
    s = Sender()
    s.send(0, b"QUIT\r\n")
    assert s.send(6, b"", fin=True) == (NEW, b"")
    assert s.stream.fin and s.stream.next_seq == s.seq(7)
    assert s.send(6, b"", fin=True) == (DUPLICATE, b"")
    assert s.send(0, b"QUIT\r\n", fin=True) == (DUPLICATE, b"")
    assert s.send(0, b"QUIT\r\n") == (DUPLICATE, b"")


def test_fin_with_data() -> None:
    s = Sender()
    assert s.send(0, b"QUIT\r\n", fin=True) == (NEW, b"QUIT\r\n")
    assert s.stream.fin and s.stream.offset == 6


@pytest.mark.parametrize("offset, data, fin, outcome", [
    (6, b"X", False, CONFLICT),       # data after the FIN
    (7, b"", True, CONFLICT),         # a second FIN elsewhere
    (5, b"", True, CONFLICT),         # a FIN inside the data
    (0, b"QUIT\r\nX", False, CONFLICT),
    (4, b"\r\n", False, DUPLICATE),
])
def test_after_fin(offset: int, data: bytes, fin: bool, outcome: Outcome) -> None:
    s = Sender()
    s.send(0, b"QUIT\r\n", fin=True)
    assert s.send(offset, data, fin) == (outcome, b"")
    assert s.stream.offset == 6


def test_fin_before_the_end_of_data_is_conflict() -> None:
    s = Sender()
    s.send(0, b"RCPT TO:<x>\r\n")
    assert s.send(0, b"RCPT", fin=True) == (CONFLICT, b"")
    assert not s.stream.fin


def test_fin_beyond_a_gap_is_gap() -> None:
    s = Sender()
    s.send(0, b"AB")
    assert s.send(3, b"", fin=True) == (GAP, b"")
    assert s.send(3, b"D", fin=True) == (GAP, b"")
    assert not s.stream.fin


# --- acknowledgements and the retained window ----------------------------------

def test_acked_bytes_are_dropped_and_no_longer_compared() -> None:
    s = Sender()
    s.send(0, b"MAIL FROM:<a@b>\r\n")
    s.ack(5)
    assert s.stream.retained == 12
    assert s.send(0, b"XXXXX") == (DUPLICATE, b"")       # entirely before the window
    assert s.send(0, b"XXXXXFROM") == (DUPLICATE, b"")   # compares what is retained
    assert s.send(0, b"XXXXXFRXM") == (CONFLICT, b"")
    assert s.send(3, b"XXFROM:<a@b>\r\nRCPT") == (NEW, b"RCPT")


def test_acks_outside_the_sent_range_are_ignored() -> None:
    s = Sender()
    s.send(0, b"0123456789")
    s.ack(11)                      # beyond what was sent
    s.ack(-1)                      # before the stream (acks only the SYN)
    assert s.stream.retained == 10
    s.ack(6)
    s.ack(4)                       # stale: behind an earlier ack
    assert s.stream.retained == 4
    s.stream.acked(s.seq(6) ^ 0x80000000)  # half the sequence space away
    assert s.stream.retained == 4
    s.ack(10)
    assert s.stream.retained == 0


def test_ack_of_the_fin() -> None:
    s = Sender()
    s.send(0, b"QUIT\r\n", fin=True)
    assert s.stream.acks_sent(s.seq(7))
    s.ack(6, fin=True)
    assert s.stream.retained == 0
    assert s.send(6, b"", fin=True) == (DUPLICATE, b"")


def test_overflow_until_acked() -> None:
    s = Sender(max_unacked=10)
    assert s.send(0, b"0123456789") == (NEW, b"0123456789")
    assert s.send(10, b"A") == (OVERFLOW, b"")
    assert s.send(10, b"", fin=True) == (NEW, b"")  # a FIN takes no room
    s = Sender(max_unacked=10)
    s.send(0, b"0123456789")
    s.ack(4)
    assert s.send(8, b"89ABCD") == (NEW, b"ABCD")
    assert s.send(14, b"E") == (OVERFLOW, b"")
    assert s.stream.offset == 14


def test_retained_buffer_stays_small_under_a_slow_drip() -> None:
    s = Sender(max_unacked=64)
    for i in range(20000):
        assert s.send(i, b"x") == (NEW, b"x")
        s.ack(i + 1 - (i % 7))
        assert len(s.stream._buf) - s.stream._start == s.stream.retained <= 7
        assert len(s.stream._buf) <= 64


# --- properties -----------------------------------------------------------------

segments = st.lists(st.tuples(st.integers(0, 400), st.integers(1, 64), st.integers(0, 400)),
                    max_size=40)


@settings(max_examples=250, deadline=None)
@given(st.binary(min_size=1, max_size=400), st.integers(0, MASK), segments)
def test_random_segmentation_and_retransmission(data: bytes, isn: int, sends) -> None:
    """Whatever the sender resends in whatever order, and whatever the
    receiver acknowledges, NEW yields exactly `data`, in order, once."""
    s = Sender(isn)
    got = bytearray()

    def send(offset: int, size: int, fin: bool = False) -> None:
        outcome, new = s.send(offset, data[offset:offset + size], fin)
        assert outcome in (NEW, DUPLICATE, GAP)
        if outcome is NEW:
            got.extend(new)
        assert got == data[:s.stream.offset]

    for offset, size, ack in sends:
        send(offset % len(data), size)
        s.ack(ack % (s.stream.offset + 1))
    for offset in range(0, len(data), 48):  # the sender finally resends it all in order
        send(offset, 48, fin=offset + 48 >= len(data))
    assert bytes(got) == data and s.stream.fin


@settings(max_examples=250, deadline=None)
@given(st.data())
def test_modified_retransmission_is_conflict(draw) -> None:
    data = draw.draw(st.binary(min_size=1, max_size=300), "data")
    s = Sender(draw.draw(st.integers(0, MASK), "isn"))
    offset = 0
    while offset < len(data):
        size = draw.draw(st.integers(1, 50))
        assert s.send(offset, data[offset:offset + size])[0] is NEW
        offset += size
    acked = draw.draw(st.integers(0, len(data) - 1), "acked")
    s.ack(acked)
    changed = draw.draw(st.integers(acked, len(data) - 1), "changed byte")
    start = draw.draw(st.integers(0, changed), "resend start")
    end = draw.draw(st.integers(changed + 1, len(data) + 10), "resend end")
    resend = bytearray(data[start:end] + b"more"[:max(0, end - len(data))])
    resend[changed - start] ^= draw.draw(st.integers(1, 255), "xor")
    assert s.send(start, bytes(resend)) == (CONFLICT, b"")
    assert s.stream.offset == len(data)


def test_streams_share_one_retain_budget():
    from sapd_nfq.engine.stream import RetainBudget

    budget = RetainBudget(100)
    a, b = Stream(1000, budget=budget), Stream(5000, budget=budget)
    assert a.receive(1001, b"x" * 60) == (Outcome.NEW, b"x" * 60)
    assert b.receive(5001, b"y" * 50)[0] is Outcome.OVERFLOW  # 60 + 50 > 100
    assert budget.used == 60
    a.acked(1001 + 30)
    assert budget.used == 30
    assert b.receive(5001, b"y" * 50)[0] is Outcome.NEW
    assert budget.used == 80
    a.release()
    b.release()
    assert budget.used == 0 and a.retained == 0 and b.retained == 0
    # Released bytes are no longer compared: a later resend of them is old news.
    assert a.receive(1001, b"z" * 60)[0] is Outcome.DUPLICATE
