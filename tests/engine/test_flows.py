from __future__ import annotations

import gc
import tracemalloc

import pytest
from helpers_tcp import CLIENT4, SERVER4, segment

from sapd_nfq.engine.flows import Flow, FlowTable, State
from sapd_nfq.engine.packet import ACK, FIN, PSH, RST, SYN, URG
from sapd_nfq.engine.stream import Outcome

NEW, DUPLICATE, GAP, CONFLICT = Outcome.NEW, Outcome.DUPLICATE, Outcome.GAP, Outcome.CONFLICT
NOTHING = (DUPLICATE, b"")
KEY = (CLIENT4, 40000, SERVER4, 25)


class Conn:
    """Both ends of one connection, numbering their segments as TCP would."""

    def __init__(self, flow: Flow | None = None, cisn: int = 100, sisn: int = 0xFFFFFFF0) -> None:
        self.flow = flow or Flow(KEY, 0.0, None)
        self.cisn, self.sisn = cisn, sisn
        self.cnext, self.snext = cisn + 1, sisn + 1

    def client(self, flags: int, payload: bytes = b"", seq: int | None = None,
               ack: int | None = None) -> tuple[Outcome, bytes]:
        seg = segment(flags, self.cnext if seq is None else seq,
                      self.snext if ack is None else ack, payload)
        return self.flow.handle(seg, True)

    def server(self, flags: int, payload: bytes = b"", seq: int | None = None,
               ack: int | None = None) -> tuple[Outcome, bytes]:
        seg = segment(flags, self.snext if seq is None else seq,
                      self.cnext if ack is None else ack, payload, from_client=False)
        return self.flow.handle(seg, False)

    def handshake(self) -> None:
        assert self.client(SYN, seq=self.cisn, ack=0) == (NEW, b"")
        assert self.server(SYN | ACK, seq=self.sisn) == (NEW, b"")
        assert self.client(ACK) == NOTHING
        assert self.flow.state is State.ESTABLISHED

    def say(self, from_client: bool, data: bytes, flags: int = ACK | PSH) -> tuple[Outcome, bytes]:
        result = self.client(flags, data) if from_client else self.server(flags, data)
        if result[0] is NEW:
            if from_client:
                self.cnext += len(data) + bool(flags & FIN)
            else:
                self.snext += len(data) + bool(flags & FIN)
        return result


def established() -> Conn:
    conn = Conn()
    conn.handshake()
    return conn


# --- the handshake ------------------------------------------------------------

def test_a_session() -> None:
    conn = established()
    assert conn.say(False, b"220 mx ESMTP\r\n") == (NEW, b"220 mx ESMTP\r\n")
    assert conn.say(True, b"EHLO c\r\n") == (NEW, b"EHLO c\r\n")
    assert conn.flow.client.offset == 8 and conn.flow.server.offset == 14
    assert conn.flow.server.isn == conn.sisn


def test_resent_syns() -> None:
    conn = Conn()
    conn.client(SYN, seq=conn.cisn, ack=0)
    assert conn.client(SYN, seq=conn.cisn, ack=0) == NOTHING
    assert conn.client(SYN, seq=conn.cisn + 7, ack=0) == (CONFLICT, b"")
    conn.server(SYN | ACK, seq=conn.sisn)
    assert conn.server(SYN | ACK, seq=conn.sisn) == NOTHING
    assert conn.server(SYN | ACK, seq=conn.sisn + 7) == (CONFLICT, b"")
    assert conn.flow.client.isn == conn.cisn and conn.flow.server.isn == conn.sisn


@pytest.mark.parametrize("closing", [False, True])
def test_a_syn_with_another_isn_on_a_live_connection_changes_nothing(closing: bool) -> None:
    # RFC 5961: the server answers it with a challenge ACK and keeps the connection
    conn = established()
    conn.say(True, b"EHLO c\r\n")
    if closing:
        conn.say(False, b"421 bye\r\n", flags=ACK | FIN)
    state = conn.flow.state
    assert conn.client(SYN, seq=conn.cisn + 12345, ack=0) == NOTHING
    assert conn.flow.state is state and conn.flow.client.isn == conn.cisn
    assert conn.say(True, b"QUIT\r\n") == (NEW, b"QUIT\r\n")


@pytest.mark.parametrize("flags, payload", [
    (SYN, b"RCPT TO:<x>\r\n"),   # a server that lost the connection would read it uninspected
    (SYN | FIN, b""),
    (SYN | ACK, b""),             # not what a client sends
])
def test_a_live_connection_refuses_other_syns(flags: int, payload: bytes) -> None:
    conn = established()
    assert conn.client(flags, payload, seq=conn.cisn + 12345, ack=0) == (CONFLICT, b"")


@pytest.mark.parametrize("from_client, flags, ack", [
    (True, SYN | ACK, None),        # simultaneous open
    (False, SYN, None),             # the server's SYN must acknowledge ours
    (False, SYN | ACK, 100),        # acknowledges another ISN
    (False, SYN | ACK, 5000),
    (True, SYN | FIN, None),
])
def test_bogus_syns(from_client: bool, flags: int, ack: int | None) -> None:
    conn = Conn()
    conn.client(SYN, seq=conn.cisn, ack=0)
    if from_client:
        assert conn.client(flags, seq=conn.cisn) == (CONFLICT, b"")
    else:
        assert conn.server(flags, seq=conn.sisn, ack=ack) == (CONFLICT, b"")
        assert conn.flow.server is None


def test_no_data_before_the_handshake_completes() -> None:
    conn = Conn()
    assert conn.server(ACK | PSH, b"220 hi\r\n") == (GAP, b"")     # no SYN-ACK seen
    conn.client(SYN, seq=conn.cisn, ack=0)
    assert conn.client(ACK | PSH, b"RCPT TO:<x>\r\n") == (GAP, b"")  # before the SYN-ACK
    assert conn.client(ACK | FIN) == (GAP, b"")
    assert conn.client(ACK) == NOTHING
    conn.server(SYN | ACK, seq=conn.sisn)
    # data that does not acknowledge the SYN-ACK cannot complete the handshake
    assert conn.client(ACK | PSH, b"RCPT TO:<x>\r\n", ack=conn.sisn) == (GAP, b"")
    assert conn.flow.state is State.SYN_SENT
    # the third packet of the handshake may carry data
    assert conn.say(True, b"EHLO c\r\n") == (NEW, b"EHLO c\r\n")
    assert conn.flow.state is State.ESTABLISHED


def test_the_servers_first_bytes_establish_a_flow_whose_last_handshake_ack_was_not_seen() -> None:
    # the rules keep most pure ACKs out of the queue, the handshake's last one too
    conn = Conn()
    assert conn.client(SYN, seq=conn.cisn, ack=0) == (NEW, b"")
    assert conn.server(SYN | ACK, seq=conn.sisn) == (NEW, b"")
    assert conn.flow.state is State.SYN_SENT
    assert conn.say(False, b"220 mail ESMTP\r\n") == (NEW, b"220 mail ESMTP\r\n")
    assert conn.flow.state is State.ESTABLISHED
    assert conn.say(True, b"EHLO c\r\n") == (NEW, b"EHLO c\r\n")


def test_a_server_segment_that_brings_nothing_new_does_not_establish() -> None:
    conn = Conn()
    conn.client(SYN, seq=conn.cisn, ack=0)
    conn.server(SYN | ACK, seq=conn.sisn)
    assert conn.server(ACK) == NOTHING
    assert conn.server(ACK | PSH, b"220 x\r\n", seq=conn.snext + 5)[0] is GAP
    assert conn.flow.state is State.SYN_SENT


def test_fast_open_data_is_judged() -> None:
    conn = Conn()
    assert conn.client(SYN, b"EHLO c\r\n", seq=conn.cisn, ack=0) == (NEW, b"EHLO c\r\n")
    assert conn.client(SYN, b"EHLO c\r\n", seq=conn.cisn, ack=0) == NOTHING
    assert conn.client(SYN, b"EHLO X\r\n", seq=conn.cisn, ack=0) == (CONFLICT, b"")
    conn.server(SYN | ACK, seq=conn.sisn)  # the server ignored the data: it comes again
    assert conn.client(ACK | PSH, b"EHLO c\r\n") == NOTHING
    assert conn.client(ACK | PSH, b"EHLO X\r\n") == (CONFLICT, b"")


# --- flags no receiver reads the way we would ---------------------------------

@pytest.mark.parametrize("flags, payload, outcome", [
    (PSH, b"RCPT TO:<x>\r\n", CONFLICT),   # no ACK: the receiver discards it
    (FIN, b"", CONFLICT),
    (0, b"", DUPLICATE),
])
def test_flags(flags: int, payload: bytes, outcome: Outcome) -> None:
    conn = established()
    assert conn.client(flags, payload) == (outcome, b"")
    assert conn.flow.client.offset == 0


def test_urgent_bytes_are_judged_in_line() -> None:
    # The engine clears URG before the segment goes on, so the receiver reads
    # the urgent byte where the stream does.
    conn = established()
    assert conn.say(True, b"XRCPT TO:<x>\r\n", flags=ACK | PSH | URG) == (NEW, b"XRCPT TO:<x>\r\n")
    assert conn.client(ACK | URG) == NOTHING
    assert conn.say(True, b"QUIT\r\n") == (NEW, b"QUIT\r\n")


# --- RST ------------------------------------------------------------------------

def test_rst_at_the_expected_seq_closes() -> None:
    conn = established()
    conn.say(True, b"EHLO c\r\n")
    assert conn.client(RST) == NOTHING
    assert conn.flow.state is State.CLOSED and conn.flow.reset
    # a RST that reached us but not the server must not end inspection
    assert conn.client(ACK | PSH, b"RCPT TO:<x>\r\n") == (CONFLICT, b"")
    assert conn.client(SYN, seq=conn.cisn, ack=0) == (CONFLICT, b"")
    assert conn.client(ACK) == NOTHING
    assert conn.client(RST) == NOTHING


@pytest.mark.parametrize("delta", [1, -1, 1000, 0x80000000])
def test_rst_elsewhere_changes_nothing(delta: int) -> None:
    conn = established()
    conn.say(True, b"EHLO c\r\n")
    assert conn.client(RST | ACK, seq=conn.cnext + delta) == NOTHING
    assert conn.flow.state is State.ESTABLISHED and not conn.flow.reset
    assert conn.say(True, b"QUIT\r\n") == (NEW, b"QUIT\r\n")


def test_rst_from_the_server() -> None:
    conn = established()
    conn.say(False, b"220 hi\r\n")
    assert conn.server(RST | ACK) == NOTHING
    assert conn.flow.state is State.CLOSED


def test_rst_at_the_fin() -> None:
    conn = established()
    conn.say(False, b"221 bye\r\n", flags=ACK | FIN)
    assert conn.server(RST, seq=conn.snext - 1) == NOTHING
    assert conn.flow.state is State.CLOSED


@pytest.mark.parametrize("flags, ack, closed", [
    (RST | ACK, 101, True),     # connection refused
    (RST, 101, False),          # without ACK, the client's TCP ignores it
    (RST | ACK, 100, False),    # does not acknowledge the SYN
])
def test_refused_connection(flags: int, ack: int, closed: bool) -> None:
    conn = Conn()
    conn.client(SYN, seq=conn.cisn, ack=0)
    assert conn.server(flags, seq=0, ack=ack) == NOTHING
    assert (conn.flow.state is State.CLOSED) is closed


# --- ACKs and FINs --------------------------------------------------------------

def test_acks_trim_the_other_direction() -> None:
    conn = established()
    conn.say(True, b"MAIL FROM:<a@b>\r\n")
    conn.say(True, b"RCPT TO:<c@d>\r\n")
    assert conn.flow.client.retained == 32
    conn.server(ACK, ack=conn.cisn + 1 + 17)
    assert conn.flow.client.retained == 15
    # acknowledged bytes are the receiver's: a changed resend of them is discarded there
    assert conn.client(ACK | PSH, b"MAIL FROM:<x@y>\r\n", seq=conn.cisn + 1) == NOTHING
    assert conn.client(ACK | PSH, b"RCPT TO:<x@y>\r\n", seq=conn.cisn + 18) == (CONFLICT, b"")
    conn.say(False, b"250 ok\r\n")
    conn.client(ACK)
    assert conn.flow.server.retained == 0


def test_fin_from_both_closes() -> None:
    conn = established()
    assert conn.say(True, b"QUIT\r\n", flags=ACK | PSH | FIN) == (NEW, b"QUIT\r\n")
    assert conn.flow.state is State.CLOSING
    assert conn.say(False, b"221 bye\r\n") == (NEW, b"221 bye\r\n")
    assert conn.client(ACK | PSH, b"RSET\r\n") == (CONFLICT, b"")  # data after its FIN
    assert conn.say(False, b"", flags=ACK | FIN) == (NEW, b"")
    assert conn.flow.state is State.CLOSED and not conn.flow.reset
    assert conn.server(ACK | FIN, seq=conn.snext - 1) == NOTHING  # resent FIN
    assert conn.client(ACK) == NOTHING
    assert conn.client(SYN, seq=9999, ack=0) == (CONFLICT, b"")   # a new connection: reopen


# --- the table ----------------------------------------------------------------------

def key(i: int) -> tuple[str, int, str, int]:
    return (f"198.18.{i >> 8 & 255}.{i & 255}", 1024 + (i >> 16), SERVER4, 25)


SYN_SEG = segment(SYN, seq=100)


def open_flow(table: FlowTable, i: int, now: float, state: str = "half") -> Flow:
    flow = table.open(key(i), SYN_SEG, now, None)
    if state != "half":
        conn = Conn(flow)
        conn.handshake()
        if state == "closed":
            conn.client(RST)
        table.touch(flow, now)
    return flow


def test_table_basics() -> None:
    table = FlowTable()
    flow = open_flow(table, 1, 5.0)
    assert table.get(key(1)) is flow and len(table) == 1
    assert (flow.created, flow.last_seen, flow.state) == (5.0, 5.0, State.SYN_SENT)
    assert flow.client is None and flow.app is None
    assert table.get(key(2)) is None
    with pytest.raises(ValueError):
        table.open(key(2), segment(ACK), 5.0, None)
    assert table.remove(key(1)) is flow and table.remove(key(1)) is None
    assert len(table) == 0
    table.touch(flow, 6.0)  # a flow no longer in the table stays out
    assert len(table) == 0


def test_open_replaces_a_flow() -> None:
    table = FlowTable()
    old = open_flow(table, 1, 0.0, "closed")
    new = table.open(key(1), SYN_SEG, 1.0, None)
    assert table.get(key(1)) is new and len(table) == 1
    table.touch(old, 2.0)
    assert table.get(key(1)) is new and len(table) == 1


def test_eviction_order() -> None:
    table = FlowTable(max_flows=4)
    open_flow(table, 0, 0.0, "established")
    open_flow(table, 1, 1.0, "established")
    open_flow(table, 2, 2.0, "half")
    open_flow(table, 3, 3.0, "closed")
    open_flow(table, 4, 4.0)
    assert table.get(key(3)) is None          # closed goes first
    open_flow(table, 5, 5.0)
    assert table.get(key(2)) is None          # then the oldest half-open
    for i in range(6, 1000):                  # a SYN flood evicts only itself
        open_flow(table, i, float(i))
    assert len(table) == 4 and table.evicted == 996
    assert table.get(key(0)) and table.get(key(1)) and table.get(key(999))


def test_established_evicted_least_recently_seen_first() -> None:
    table = FlowTable(max_flows=3)
    flows = [open_flow(table, i, float(i), "established") for i in range(3)]
    table.touch(flows[0], 10.0)
    open_flow(table, 3, 11.0)
    assert table.get(key(1)) is None and table.get(key(0)) is flows[0]
    table.max_flows = 1                       # a smaller limit applies at the next open
    open_flow(table, 4, 12.0)
    assert len(table) == 1 and table.get(key(4))


def test_timeouts() -> None:
    table = FlowTable(syn_timeout=30.0, idle_timeout=900.0, closed_timeout=10.0)
    half = open_flow(table, 0, 0.0)
    live = open_flow(table, 1, 0.0, "established")
    closed = open_flow(table, 2, 0.0, "closed")
    assert table.expire(9.0) == []
    assert table.expire(10.0) == [closed]
    table.touch(half, 20.0)
    assert table.expire(49.0) == []
    assert table.expire(50.0) == [half]
    assert table.expire(899.0) == []
    assert table.expire(900.0) == [live]
    assert len(table) == 0 and table.expired == 3


def test_timeout_follows_the_state_even_before_touch() -> None:
    table = FlowTable(closed_timeout=10.0)
    conn = Conn(open_flow(table, 0, 0.0, "established"))
    conn.client(RST)                          # closed by the last packet; touch came before
    assert table.expire(10.0) == [conn.flow]


def test_expire_is_bounded_per_call() -> None:
    table = FlowTable()
    for i in range(10):
        open_flow(table, i, 0.0)
    assert len(table.expire(100.0, limit=3)) == 3
    assert len(table.expire(100.0, limit=3)) == 3
    assert len(table.expire(100.0)) == 4
    assert table.expired == 10


def test_ten_thousand_flows_are_small() -> None:
    gc.collect()
    tracemalloc.start()
    try:
        table = FlowTable()
        for i in range(10000):
            conn = Conn(open_flow(table, i, 0.0, "established"))
            conn.say(False, b"220 mx.example ESMTP\r\n")
            conn.say(True, b"EHLO client.example\r\n")
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(table) == 10000
    assert size < 16 * 2**20, f"{size / 10000:.0f} bytes a flow"


def test_a_flow_leaving_the_table_gives_back_its_retained_bytes():
    table = FlowTable(max_flows=16, retain_budget=1000)
    key = ("198.18.0.1", 40000, "198.18.0.2", 25)
    syn = segment(SYN, seq=100)
    flow = table.open(key, syn, 0.0, None)
    flow.handle(syn, True)
    flow.handle(segment(SYN | ACK, seq=900, ack=101, from_client=False), False)
    flow.handle(segment(ACK, seq=101, ack=901), True)
    assert flow.handle(segment(ACK | PSH, seq=101, ack=901, payload=b"x" * 400), True)[0] is Outcome.NEW
    assert table.budget.used == 400
    table.remove(key)
    assert table.budget.used == 0
