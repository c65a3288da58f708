"""Monitor mode (`enforce = false`): every path that can drop, rewrite, reset
or answer is decided as when enforcing, and `carried` passes the packet as
it came. Each case first shows that the engine's own decision refuses (the
test could fail), then that what is carried out does not.
"""

from __future__ import annotations

import dataclasses

import pytest
from engine_helpers import CLIENT6, SERVER6, Conn, make_engine
from scapy.layers.inet import IP, TCP

from sapd_nfq.engine.verdicts import ACCEPT, BYPASS, DROP, Decision, Notice, carried, watched

FAIL = Notice("fail", "198.18.1.2", "198.18.2.2", sender="a@x.example", recipient="b@y.example",
              row="no login", reason="relay denied")
PASS = Notice("pass", "198.18.1.2", "198.18.2.2", recipient="alice@lab.example", row="local")
RESET = Notice("reset", "198.18.1.2", "198.18.2.2", reason="retransmission differs")
TLS_REFUSED = Notice("tls", "198.18.1.2", "198.18.2.2", reason="STARTTLS not allowed by policy")
TLS_STARTED = Notice("tls", "198.18.1.2", "198.18.2.2", reason="TLS started")

# every kind of decision the engine makes: (decision, what enforcing carries out)
KINDS = {
    "pass": Decision(ACCEPT, notices=(PASS,)),
    "drop": Decision(DROP, reason="held_back"),
    "drop and reset": Decision(DROP, inject=(b"rst", b"rst"), notices=(RESET,),
                               reason="retransmission_differs"),
    "relay refused": Decision(DROP, inject=(b"550", b"rst"), notices=(PASS, FAIL),
                              reason="relay_denied"),
    "refused in place": Decision(ACCEPT, packet=b"rewritten", notices=(FAIL,), reason="relay_denied"),
    "tls refused": Decision(DROP, inject=(b"454",), notices=(TLS_REFUSED,),
                            reason="starttls_not_allowed"),
    "rewrite": Decision(ACCEPT, packet=b"hidden", reason="starttls_hidden"),
    "bypass": Decision(BYPASS, notices=(TLS_STARTED,)),
    "bypass with a rewrite": Decision(BYPASS, packet=b"x", reason="starttls_hidden"),
    "engine error": Decision(DROP, reason="engine_error"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_watched_passes_every_kind_of_decision_unchanged(kind):
    decision = KINDS[kind]
    out = watched(decision)
    assert out.verdict is (BYPASS if decision.verdict is BYPASS else ACCEPT)
    assert out.packet is None and out.inject == () and not out.refuses
    assert out.reason == decision.reason


@pytest.mark.parametrize("kind", KINDS)
def test_enforcing_carries_out_the_decision_itself(kind):
    assert carried(KINDS[kind], True) is KINDS[kind]
    assert carried(KINDS[kind], False) == watched(KINDS[kind])


def test_refusals_become_would_be_notices_with_the_same_fields():
    out = watched(KINDS["relay refused"])
    assert [n.event for n in out.notices] == ["pass", "would-fail"]
    assert dataclasses.replace(out.notices[1], event="fail") == FAIL
    assert str(out.notices[1]).startswith("WOULD-FAIL client=198.18.1.2 ")
    assert [n.event for n in watched(KINDS["refused in place"]).notices] == ["would-fail"]
    assert [n.event for n in watched(KINDS["drop and reset"]).notices] == ["would-reset"]
    assert [n.event for n in watched(KINDS["tls refused"]).notices] == ["would-tls"]


def test_notices_of_a_decision_that_refuses_nothing_stay():
    assert watched(KINDS["pass"]).notices == (PASS,)
    assert watched(KINDS["bypass"]).notices == (TLS_STARTED,)


# --- the engine's paths, in monitor mode ---------------------------------------

class Watched(Conn):
    """A connection through a gate in monitor mode: what the engine decided is
    kept in `decided`, and the peers see what `carried` lets by."""

    def feed(self, packet: bytes, from_client_side: bool | None = None) -> Decision:
        self.decided = super().feed(packet, from_client_side)
        return carried(self.decided, self.engine.config.enforce)


def monitor(**config) -> Conn:
    return Watched(make_engine(enforce=False, **config))


def passed(conn: Watched, decision: Decision) -> bool:
    """The engine refused, and the packet went on as it came."""
    return conn.decided.refuses and decision.verdict is ACCEPT and not decision.refuses


@pytest.mark.parametrize("refusal", ["session", "recipient"])
def test_a_relay_refusal_is_logged_and_passes(refusal):
    conn = monitor(refusal=refusal)
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<x@external.example>\r\n")
    d = conn.client(b"RCPT TO:<dave@external.example>\r\n")
    assert [n.event for n in d.notices] == ["would-fail"] and d.reason == "relay_denied"
    assert d.verdict is ACCEPT and not d.refuses
    if refusal == "session":
        assert conn.decided.verdict is DROP and conn.decided.inject


def test_monitor_mode_follows_the_session_after_a_would_be_refusal_of_a_recipient():
    # Nothing was rewritten: the MTA's 250 to the RCPT is no sign of a rewrite gone
    # wrong, and the next RCPT is judged as the MTA reads it.
    conn = monitor(refusal="recipient")
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<x@external.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n")
    conn.client(b"RCPT TO:<dave@external.example>\r\n")
    d = conn.server(b"250 2.1.5 Ok\r\n")
    assert not d.notices and not conn.decided.refuses
    d = conn.client(b"RCPT TO:<alice@lab.example>\r\n")
    assert [n.event for n in d.notices] == ["pass"]
    assert conn.engine.counters["conflicts"] == 0 and conn.engine.counters["protocol_errors"] == 0


def test_a_protocol_error_passes():
    conn = monitor()
    conn.smtp_greeting()
    d = conn.client(b"MAIL FROM:<a@lab.example>\0\r\n")
    assert passed(conn, d) and d.reason == "protocol_error"
    assert [n.event for n in d.notices] == ["would-reset"]
    # the refused session's stragglers pass too
    d = conn.client(b"RCPT TO:<dave@external.example>\r\n")
    assert passed(conn, d) and d.reason == "refused_session"


def test_a_conflicting_retransmission_passes():
    conn = monitor()
    conn.smtp_greeting()
    start = conn.cseq
    conn.client(b"RCPT TO:<bo")
    d = conn.feed(conn.packet(True, b"RCPT TO:<dave@external.example>\r\n", seq=start))
    assert passed(conn, d) and d.reason == "retransmission_differs"


def test_data_beyond_a_gap_passes():
    conn = monitor()
    conn.smtp_greeting()
    d = conn.feed(conn.packet(True, b"RCPT TO:<x@external.example>\r\n", seq=conn.cseq + 10))
    assert passed(conn, d) and d.reason == "held_back"


def test_a_flow_not_seen_open_passes():
    conn = monitor()
    d = conn.client(b"RCPT TO:<dave@external.example>\r\n")
    assert passed(conn, d) and d.reason == "untracked_connection"


def test_a_flow_evicted_from_a_full_table_passes():
    engine = make_engine(enforce=False, max_flows=16)
    first = Watched(engine, cport=30000)
    first.smtp_greeting()
    for port in range(30001, 30017):
        Watched(engine, cport=port).handshake()
    assert engine.flows.evicted
    d = first.client(b"RCPT TO:<dave@external.example>\r\n")
    assert passed(first, d) and d.reason == "untracked_connection"


def test_truncated_and_malformed_packets_pass():
    engine = make_engine(enforce=False)
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(dport=25, flags="PA") / (b"x" * 100))
    for packet in (pkt[:80], b"\x45garbage"):
        decision = engine.handle(packet, 1.0)
        assert decision.verdict is DROP
        assert carried(decision, False).verdict is ACCEPT
    assert engine.counters["truncated"] == 1 and engine.counters["malformed"] == 1


def test_starttls_is_neither_hidden_nor_refused():
    conn = monitor()
    conn.handshake()
    conn.server(b"220 mx.lab.example ESMTP Postfix\r\n")
    conn.client(b"EHLO client.example\r\n")
    d = conn.server(b"250-mx.lab.example\r\n250 STARTTLS\r\n")
    assert passed(conn, d) and d.reason == "starttls_hidden"
    d = conn.client(b"STARTTLS\r\n")
    assert passed(conn, d) and [n.event for n in d.notices] == ["would-tls"]


def test_an_urgent_pointer_is_not_cleared():
    conn = monitor()
    conn.smtp_greeting()
    d = conn.feed(conn.packet(True, b"NOOP\r\n", flags="PAU", urgptr=1))
    assert passed(conn, d) and d.reason == "urgent_cleared"


def test_a_switch_takes_effect_for_the_next_decision_of_an_open_flow():
    conn = monitor(refusal="recipient")
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<x@external.example>\r\n")
    assert conn.client(b"RCPT TO:<dave@external.example>\r\n").notices[0].event == "would-fail"
    engine = conn.engine
    engine.reconfigure(dataclasses.replace(engine.config, enforce=True), engine.policy)
    d = conn.client(b"RCPT TO:<erin@external.example>\r\n")
    assert d.packet is not None and [n.event for n in d.notices] == ["fail"]


def test_ipv6_too():
    conn = Watched(make_engine(enforce=False), client=CLIENT6, server=SERVER6)
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<x@external.example>\r\n")
    d = conn.client(b"RCPT TO:<dave@external.example>\r\n")
    assert passed(conn, d) and d.notices[0].event == "would-fail"
