"""The engine end to end on packet bytes: verdicts, injections, notices."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from engine_helpers import CLIENT4, CLIENT6, SERVER6, Conn, make_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from streams import random_chunks

from sapd_nfq.engine.logins import StoreError
from sapd_nfq.engine.packet import ACK, FIN, RST, URG, parse, tcp_checksum_ok
from sapd_nfq.engine.policy import ROW_LOGGED_IN, ROW_NOT_LOCAL, ROW_NOT_LOGGED_IN, ROW_RECIPIENT_LOCAL
from sapd_nfq.engine.refusal import Refusals
from sapd_nfq.engine.smtp import MAX_PENDING_BYTES
from sapd_nfq.engine.stream import MAX_UNACKED
from sapd_nfq.engine.verdicts import ACCEPT, BYPASS, DROP

C, S = "client", "server"
RELAY = b"MAIL FROM:<alice@lab.example>\r\nRCPT TO:<dave@external.example>\r\n"


def notices(decision, event):
    return [n for n in decision.notices if n.event == event]


def assert_refused(decision, conn, reply_code: bytes):
    """Dropped; the client gets the reply with FIN; the server gets an RST at the dropped seq."""
    assert decision.verdict is DROP
    to_client, to_server = (parse(p) for p in decision.inject)
    assert (to_client.src, to_client.dst) == (conn.server_addr, conn.client_addr)
    assert to_client.payload.startswith(reply_code)
    assert to_client.flags & FIN
    assert to_client.seq == conn.sseq
    assert (to_server.src, to_server.dst) == (conn.client_addr, conn.server_addr)
    assert to_server.flags & RST and to_server.seq == conn.cseq


def test_inbound_mail_to_a_local_recipient_passes():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    assert conn.client(b"MAIL FROM:<dave@external.example>\r\n").verdict is ACCEPT
    d = conn.client(b"RCPT TO:<Alice@LAB.example>\r\n")
    assert d.verdict is ACCEPT and not d.inject
    [n] = notices(d, "pass")
    assert (n.client, n.sender, n.recipient, n.row) == (
        conn.client_addr, "dave@external.example", "Alice@LAB.example", ROW_RECIPIENT_LOCAL)


def test_spellings_postfix_delivers_to_a_local_user_pass_as_local():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\n")
    for spelled in (b'<"alice"@lab.example>', b'<"al\\ice"@lab.example>', b"<alice@lab.example.>"):
        d = conn.client(b"RCPT TO:" + spelled + b"\r\n")
        assert d.verdict is ACCEPT
        [n] = notices(d, "pass")
        assert (n.recipient, n.row) == ("alice@lab.example", ROW_RECIPIENT_LOCAL)
    assert_refused(conn.client(b'RCPT TO:<"dave"@external.example.>\r\n'), conn, b"550 5.7.1")


def test_relay_without_login_is_refused_with_550_and_resets():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    d = conn.client(RELAY)
    assert_refused(d, conn, b"550 5.7.1")
    [n] = notices(d, "fail")
    assert n.row == ROW_NOT_LOGGED_IN and n.recipient == "dave@external.example"
    # The client's retransmission or next bytes: dropped, and reset again.
    again = conn.client(RELAY)
    assert again.verdict is DROP and parse(again.inject[0]).flags & RST
    # Whatever the server still sends never reaches the client.
    assert conn.server(b"250 2.1.0 Ok\r\n").verdict is DROP


def test_login_window_expires():
    engine = make_engine(auth_ttl=60)
    pop = Conn(engine, sport=110)
    pop.pop3_login()
    smtp = Conn(engine, now=pop.now + 61)
    smtp.smtp_greeting()
    assert notices(smtp.client(RELAY), "fail")[0].row == ROW_NOT_LOGGED_IN


def test_non_local_sender_fails_even_when_logged_in():
    engine = make_engine()
    Conn(engine, sport=110).pop3_login()
    conn = Conn(engine, cport=40001, now=2000.0)
    conn.smtp_greeting()
    d = conn.client(b"MAIL FROM:<dave@external.example>\r\nRCPT TO:<carol@other.example>\r\n")
    assert_refused(d, conn, b"550")
    assert notices(d, "fail")[0].row == ROW_NOT_LOCAL


def test_a_rcpt_split_over_segments_is_judged_on_the_segment_that_completes_it():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    assert conn.client(b"MAIL FROM:<alice@lab.example>\r\n").verdict is ACCEPT
    assert conn.client(b"RCPT TO:<dave@ex").verdict is ACCEPT  # incomplete: the MTA waits too
    assert_refused(conn.client(b"ternal.example>\r\n"), conn, b"550")


def test_a_bare_lf_ends_a_command_as_the_mta_sees_it():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    assert_refused(conn.client(b"MAIL FROM:<alice@lab.example>\nRCPT TO:<d@external.example>\n"),
                   conn, b"550")


def test_data_refused_then_rcpt_is_still_judged():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<alice@lab.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n")
    conn.client(b"DATA\r\n")
    conn.server(b"554 5.5.1 Error: no valid recipients\r\n")
    assert_refused(conn.client(b"RCPT TO:<dave@external.example>\r\n"), conn, b"550")


def test_a_message_body_is_not_read_as_commands():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\nRCPT TO:<bob@lab.example>\r\nDATA\r\n")
    conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    body = b"Subject: hi\r\n\r\nRCPT TO:<x@external.example>\r\n..\r\nMAIL FROM:<y@z>\r\n"
    d = conn.client(body)
    assert d.verdict is ACCEPT and not d.notices
    # After the end of data, commands are judged again.
    assert_refused(conn.client(b".\r\nMAIL FROM:<alice@lab.example>\r\nRCPT TO:<x@external.example>\r\n"),
                   conn, b"550")


def test_smuggled_end_of_data_does_not_hide_a_rcpt():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\nRCPT TO:<bob@lab.example>\r\nDATA\r\n")
    conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n")
    d = conn.client(b"text\n.\r\nMAIL FROM:<alice@lab.example>\r\nRCPT TO:<x@external.example>\r\n")
    assert_refused(d, conn, b"550")


def test_bytes_after_data_before_354_are_refused():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\nRCPT TO:<bob@lab.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert_refused(conn.client(b"DATA\r\nRCPT TO:<x@external.example>\r\n"), conn, b"554")


MSS = 1448  # an Ethernet segment's payload with TCP timestamps


def segments(data: bytes, size: int = MSS) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


CUTS = {
    "whole": lambda data: [data],              # one segment, as GRO hands it on
    "mss": segments,
    "random": lambda data: random_chunks(data, random.Random(len(data))),
}


@pytest.mark.parametrize("cut", CUTS)
def test_a_thousand_pipelined_local_recipients_pass_and_every_reply_matches(cut):
    conn = Conn(make_engine())
    conn.smtp_greeting()
    recipients = [f"alice+r{i:04d}@lab.example" for i in range(1000)]
    burst = (b"MAIL FROM:<dave@external.example>\r\n"
             + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients) + b"DATA\r\n")
    passed = []
    for piece in CUTS[cut](burst):
        d = conn.client(piece)
        assert d.verdict is ACCEPT and not d.inject
        passed += [n.recipient for n in notices(d, "pass")]
    assert passed == recipients
    replies = b"250 2.1.0 Ok\r\n" + b"250 2.1.5 Ok\r\n" * 1000 + b"354 End data with <CR><LF>.<CR><LF>\r\n"
    for piece in CUTS[cut](replies):
        assert conn.server(piece).verdict is ACCEPT  # the 354 answers DATA, nothing else
    assert conn.client(b"Subject: many\r\n\r\nRCPT TO:<x@external.example>\r\n.\r\n").verdict is ACCEPT
    assert conn.server(b"250 2.0.0 Ok: queued\r\n").verdict is ACCEPT
    assert conn.engine.counters["protocol_errors"] == 0
    assert_refused(conn.client(RELAY), conn, b"550")  # in step to the end: commands judged again


def test_a_pipelined_burst_over_the_byte_budget_is_refused():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    mail = b"MAIL FROM:<dave@external.example>\r\n"  # shorter than a waiting command's cost, 64
    line = b"RCPT TO:<alice+%s@lab.example>\r\n" % (b"x" * 200)
    crossing = (MAX_PENDING_BYTES - 64) // len(line) + 1  # the line that no longer fits
    end = len(mail) + crossing * len(line)
    burst = mail + line * crossing
    sent = passed = 0
    for piece in segments(burst):
        d = conn.client(piece)
        if d.verdict is DROP:
            break
        passed += len(notices(d, "pass"))
        sent += len(piece)
    assert sent < end <= sent + len(piece)  # the segment that completes that line
    assert passed == burst[:sent].count(b"\n") - 1  # each RCPT the accepted segments completed
    assert_refused(d, conn, b"554 5.7.1")
    [n] = notices(d, "reset")
    assert f"exceed {MAX_PENDING_BYTES} bytes" in n.reason


def test_bdat_chunks_are_skipped_by_count():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\nRCPT TO:<bob@lab.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    chunk = b"RCPT TO:<x@external.example>\r\n"
    d = conn.client(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert d.verdict is ACCEPT and not notices(d, "fail")


def test_smtp_auth_counts_as_logged_in():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    d = conn.server(b"235 2.7.0 Authentication successful\r\n")
    [n] = notices(d, "login")
    assert n.user == "alice" and "smtp-auth" in n.reason
    d = conn.client(RELAY)
    assert d.verdict is ACCEPT and notices(d, "pass")[0].user == "alice"


def test_smtp_auth_does_not_count_when_configured_off():
    conn = Conn(make_engine(smtp_auth_relays=False))
    conn.smtp_greeting()
    conn.client(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    conn.server(b"235 2.7.0 Authentication successful\r\n")
    assert conn.client(RELAY).verdict is DROP


def test_starttls_offer_is_hidden_in_place_by_default():
    conn = Conn(make_engine())
    conn.handshake()
    conn.server(b"220 mx ESMTP\r\n")
    conn.client(b"EHLO c\r\n")
    d = conn.server(b"250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
    assert d.verdict is ACCEPT and d.packet is not None
    seg = parse(d.packet)
    assert seg.payload == b"250-mx\r\n250-XXXXXXXX\r\n250 8BITMIME\r\n"
    assert tcp_checksum_ok(d.packet)


def assert_urgent_cleared(decision, sent: bytes) -> None:
    """The verdict's packet is `sent` without URG and urgent pointer."""
    assert decision.verdict is ACCEPT and decision.packet is not None
    out, original = parse(decision.packet), parse(sent)
    assert not out.flags & URG and out.flags == original.flags & ~URG
    assert decision.packet[out.tcp_offset + 18:out.tcp_offset + 20] == b"\0\0"
    assert tcp_checksum_ok(decision.packet)


def test_urgent_data_reaches_the_server_in_line():
    # The MTA's TCP would take the urgent byte 'X' out of the stream and hand
    # Postfix "RCPT TO:..." while we read "XRCPT": cleared, it reads "XRCPT" too.
    conn = Conn(make_engine())
    conn.smtp_greeting()
    hidden = b"XRCPT TO:<dave@external.example>\r\n"
    sent = conn.packet(True, hidden, flags="PAU", urgptr=1)
    d = conn.feed(sent)
    assert_urgent_cleared(d, sent)
    assert parse(d.packet).payload == hidden and not d.notices
    conn.cseq += len(hidden)
    assert conn.server(b"502 5.5.2 Error: command not recognized\r\n").verdict is ACCEPT
    assert conn.engine.counters["urgent_cleared"] == 1
    assert_refused(conn.client(RELAY), conn, b"550 5.7.1")


def test_urgent_pointer_aiming_at_later_data_is_cleared_too():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    sent = conn.packet(True, flags="AU", urgptr=40)
    assert_urgent_cleared(conn.feed(sent), sent)


def test_urgent_flag_on_a_hidden_starttls_offer():
    conn = Conn(make_engine())
    conn.handshake()
    conn.server(b"220 mx ESMTP\r\n")
    conn.client(b"EHLO c\r\n")
    reply = b"250-mx\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
    sent = conn.packet(False, reply, flags="PAU", urgptr=3)
    d = conn.feed(sent)
    assert_urgent_cleared(d, sent)
    assert parse(d.packet).payload == reply.replace(b"STARTTLS", b"XXXXXXXX")


def test_starttls_offer_split_over_segments_is_hidden_where_it_completes():
    conn = Conn(make_engine())
    conn.handshake()
    conn.server(b"220 mx ESMTP\r\n")
    conn.client(b"EHLO c\r\n")
    conn.server(b"250-mx\r\n250-STAR")
    d = conn.server(b"TTLS\r\n250 8BITMIME\r\n")
    assert parse(d.packet).payload.startswith(b"XXXX\r\n")


def test_starttls_requested_anyway_is_refused_with_454():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    d = conn.client(b"STARTTLS\r\n")
    assert_refused(d, conn, b"454 4.7.0")
    assert notices(d, "tls")


def test_relay_clients_policy_lets_logged_in_clients_use_tls():
    engine = make_engine(smtp_starttls="relay-clients")
    Conn(engine, sport=110).pop3_login()
    conn = Conn(engine, cport=40002, now=2000.0)
    conn.handshake()
    conn.server(b"220 mx ESMTP\r\n")
    conn.client(b"EHLO c\r\n")
    assert conn.server(b"250-mx\r\n250 STARTTLS\r\n").packet is None
    assert conn.client(b"STARTTLS\r\n").verdict is ACCEPT
    d = conn.server(b"220 2.0.0 Ready to start TLS\r\n")
    assert d.verdict is BYPASS and notices(d, "tls")


def test_relay_clients_policy_still_hides_tls_from_others():
    conn = Conn(make_engine(smtp_starttls="relay-clients"))
    conn.handshake()
    conn.server(b"220 mx ESMTP\r\n")
    conn.client(b"EHLO c\r\n")
    assert b"XXXXXXXX" in parse(conn.server(b"250-mx\r\n250 STARTTLS\r\n").packet).payload


# --- POP3 and IMAP alike ---------------------------------------------------------

@dataclass(frozen=True)
class Mailbox:
    """A mailbox protocol's lines, for what the engine does with both alike."""

    protocol: str
    port: int
    #: from the greeting to the server's TLS offer, and the offer as it passes hidden
    offer: list[tuple[str, bytes]]
    hidden: bytes
    #: alice logs in with "secret", up to the server's reply (`method`: how)
    login: list[tuple[str, bytes]]
    logged_in: bytes
    method: str
    #: alice tries a wrong password, up to the server's reply
    wrong: list[tuple[str, bytes]]
    failed: bytes
    starttls: bytes
    tls_started: bytes
    #: the config key for TLS, and how a refusal reads
    tls_key: str
    refused: bytes
    #: a client line no server would read as we do
    broken: bytes
    #: server bytes after a login, no longer inspected
    after_login: bytes


IMAP_GREETING = b"* OK [CAPABILITY IMAP4rev1 LITERAL+ STARTTLS AUTH=PLAIN] Dovecot ready.\r\n"
POP3 = Mailbox(
    "pop3", 110,
    offer=[(S, b"+OK Dovecot ready.\r\n"), (C, b"CAPA\r\n"), (S, b"+OK\r\nSTLS\r\nUSER\r\n.\r\n")],
    hidden=b"\r\nXXXX\r\n",
    login=[(S, b"+OK Dovecot ready.\r\n"), (C, b"USER alice\r\n"), (S, b"+OK\r\n"),
           (C, b"PASS secret\r\n")],
    logged_in=b"+OK Logged in.\r\n", method="USER",
    wrong=[(S, b"+OK ready\r\n"), (C, b"USER alice\r\n"), (S, b"+OK\r\n"), (C, b"PASS wrong\r\n")],
    failed=b"-ERR [AUTH] Authentication failed.\r\n",
    starttls=b"STLS\r\n", tls_started=b"+OK Begin TLS negotiation now.\r\n",
    tls_key="pop3_stls", refused=b"-ERR", broken=b"USER b\x00ob\r\n",
    after_login=b"+OK 2 messages\r\n")
IMAP = Mailbox(
    "imap", 143,
    offer=[(S, IMAP_GREETING)],
    hidden=b" XXXXXXXX ",
    login=[(S, IMAP_GREETING), (C, b"a1 LOGIN {5+}\r\nalice secret\r\n")],
    logged_in=b"a1 OK [CAPABILITY IMAP4rev1] Logged in\r\n", method="LOGIN",
    wrong=[(S, IMAP_GREETING), (C, b"a1 LOGIN alice wrong\r\n")],
    failed=b"a1 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
    starttls=b"a STARTTLS\r\n", tls_started=b"a OK Begin TLS negotiation now.\r\n",
    tls_key="imap_starttls", refused=b"* BYE", broken=b"a* LOGIN bob x\r\n",
    after_login=b"* 2 EXISTS\r\n")
MAILBOXES = pytest.mark.parametrize("box", [POP3, IMAP], ids=lambda box: box.protocol)


def play(conn: Conn, steps: list[tuple[str, bytes]]):
    """Each step on its side; the last step's Decision."""
    decision = None
    for side, data in steps:
        decision = conn.client(data) if side == C else conn.server(data)
    return decision


@MAILBOXES
def test_a_mailbox_login_then_relay_passes_and_the_mailbox_leaves_the_queue(box):
    engine = make_engine()
    mailbox = Conn(engine, cport=41000, sport=box.port)
    mailbox.handshake()
    play(mailbox, box.login)
    d = mailbox.server(box.logged_in)
    assert d.verdict is BYPASS
    [n] = notices(d, "login")
    assert (n.user, n.reason) == ("alice", f"{box.protocol} {box.method}") and "secret" not in repr(d)
    [login] = engine.logins.entries(mailbox.now)
    assert (login.address, login.user, login.source) == (mailbox.client_addr, "alice", box.protocol)
    # The mailbox's download after the login is no longer inspected.
    assert mailbox.server(box.after_login).verdict is BYPASS

    smtp = Conn(engine, now=mailbox.now)
    smtp.smtp_greeting()
    d = smtp.client(RELAY)
    assert d.verdict is ACCEPT
    [n] = notices(d, "pass")
    assert n.row == ROW_LOGGED_IN and n.user == "alice"


@MAILBOXES
def test_a_failed_mailbox_login_grants_nothing(box):
    engine = make_engine()
    mailbox = Conn(engine, sport=box.port)
    mailbox.handshake()
    play(mailbox, box.wrong)
    d = mailbox.server(box.failed)
    assert d.verdict is ACCEPT and notices(d, "login-failed")
    assert not engine.logins.entries(mailbox.now)


@MAILBOXES
def test_mailbox_tls_allowed_by_default_and_hidden_on_request(box):
    allow = Conn(make_engine(), sport=box.port)
    allow.handshake()
    assert play(allow, box.offer).packet is None
    allow.client(box.starttls)
    assert allow.server(box.tls_started).verdict is BYPASS

    strip = Conn(make_engine(**{box.tls_key: "strip"}), sport=box.port)
    strip.handshake()
    assert box.hidden in parse(play(strip, box.offer).packet).payload
    assert_refused(strip.client(box.starttls), strip, box.refused)


@MAILBOXES
def test_a_mailbox_stream_it_cannot_follow_leaves_the_queue(box):
    mailbox = Conn(make_engine(), sport=box.port)
    mailbox.handshake()
    play(mailbox, box.offer[:1])
    d = mailbox.client(box.broken)
    assert d.verdict is BYPASS
    [n] = notices(d, "error")
    assert n.reason.startswith(f"{box.protocol.upper()}: ")


@MAILBOXES
def test_an_untracked_mailbox_connection_leaves_the_queue(box):
    conn = Conn(make_engine(), sport=box.port)
    assert conn.client(b"NOOP\r\n").verdict is BYPASS


@MAILBOXES
def test_urgent_data_on_a_mailbox_is_read_in_line(box):
    conn = Conn(make_engine(), sport=box.port)
    conn.handshake()
    play(conn, box.login[:1])
    sent = conn.packet(True, box.login[1][1], flags="PAU", urgptr=5)
    assert_urgent_cleared(conn.feed(sent), sent)


def test_untracked_smtp_connection_is_reset_both_ways():
    conn = Conn(make_engine())
    d = conn.client(b"RCPT TO:<dave@external.example>\r\n")
    assert d.verdict is DROP
    to_client, probe, to_server = (parse(p) for p in d.inject)
    assert to_client.flags & RST and to_client.dst == conn.client_addr
    assert to_server.flags & RST and to_server.dst == conn.server_addr
    # a server already past this seq ignores that RST; the probe makes it answer
    assert probe.flags == ACK and probe.dst == conn.server_addr and not probe.payload
    assert (probe.seq, probe.ack) == (to_server.seq, conn.sseq)


def test_the_answer_to_the_probe_draws_a_reset_that_lands():
    # The server's duplicate ACK, untracked too: its ack is where a RST to it lands.
    conn = Conn(make_engine())
    d = conn.server(b"", flags="A")
    to_server = parse(d.inject[0])
    assert d.verdict is DROP and to_server.flags & RST and to_server.dst == conn.server_addr
    assert to_server.seq == conn.cseq


def test_an_untracked_reset_is_dropped_and_answered_with_nothing():
    d = Conn(make_engine()).client(b"", flags="RA")
    assert d.verdict is DROP and not d.inject


def test_a_syn_flood_that_overflows_the_table_costs_no_crafted_packets():
    # Half-open flows are evicted first; their SYN-ACKs are dropped, never answered.
    engine = make_engine(max_flows=8)
    conns = [Conn(engine, cport=41000 + i) for i in range(20)]
    for conn in conns:
        assert not conn.feed(conn.packet(True, flags="S", ack=0)).inject
    for conn in conns:
        conn.cseq += 1
        d = conn.feed(conn.packet(False, flags="SA"))
        assert not d.inject and (d.verdict is DROP) is (conn.cport < 41012)
    assert engine.flows.evicted == 12 and len(engine.flows) == 8
    # the client whose SYN-ACK was dropped sends its SYN again and gets through
    again = conns[0]
    again.cseq -= 1
    assert again.handshake()[1].verdict is ACCEPT


def test_refused_sessions_give_their_slots_up_before_live_ones():
    # A relay flood leaves a refused flow per attempt: it must not push out the
    # idle sessions nor the handshakes that come after it.
    engine = make_engine(max_flows=4)
    idle = Conn(engine, cport=40100)
    idle.smtp_greeting()
    for i in range(10):
        attempt = Conn(engine, cport=40200 + i, now=idle.now)
        attempt.smtp_greeting()
        assert_refused(attempt.client(RELAY), attempt, b"550 5.7.1")
    assert engine.flows.get((idle.client_addr, idle.cport, idle.server_addr, idle.sport)) is not None
    assert idle.client(b"QUIT\r\n").verdict is ACCEPT


def test_a_retransmission_with_different_bytes_is_refused():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    first = conn.packet(True, b"MAIL FROM:<dave@external.example>\r\n")
    assert conn.feed(first).verdict is ACCEPT
    forged = conn.packet(True, b"RCPT TO:<x@external.example>\r\nQUIT\r\n")
    d = conn.feed(forged)
    assert d.verdict is DROP and d.inject
    assert conn.engine.counters["conflicts"] == 1


def resets_to_server(decision, conn) -> list[int]:
    """The seqs of the RSTs the refusal sends the server."""
    return sorted(seg.seq for seg in map(parse, decision.inject)
                  if seg.flags & RST and seg.dst == conn.server_addr)


def test_a_conflict_resets_the_server_where_it_may_stand():
    # The server may hold what we let through (it starts a resend that differs) or
    # have lost it after us: only the exact seq resets it, so both go.
    conn = Conn(make_engine())
    conn.smtp_greeting()
    start = conn.cseq
    assert conn.client(b"RCPT TO:<bo").verdict is ACCEPT
    d = conn.feed(conn.packet(True, b"RCPT TO:<dave@external.example>\r\n", seq=start))
    assert d.verdict is DROP and conn.engine.counters["conflicts"] == 1
    assert resets_to_server(d, conn) == [start, start + 11]


def test_a_refused_resend_that_overlaps_resets_the_server_after_what_passed():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    start = conn.cseq
    mail = b"MAIL FROM:<alice@lab.example>\r\n"
    assert conn.client(mail).verdict is ACCEPT  # passed; its ACK not seen yet
    d = conn.feed(conn.packet(True, mail + b"RCPT TO:<dave@external.example>\r\n", seq=start))
    assert d.verdict is DROP and notices(d, "fail")
    assert resets_to_server(d, conn) == [start, start + len(mail)]


def test_data_beyond_a_gap_waits_for_the_gap():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    later = conn.packet(True, b"RCPT TO:<x@external.example>\r\n", seq=conn.cseq + 10)
    assert conn.feed(later).verdict is DROP and not conn.feed(later).inject


def test_malformed_and_truncated_packets_are_dropped():
    engine = make_engine()
    assert engine.handle(b"\x45garbage", 1.0).verdict is DROP
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(dport=25, flags="PA") / (b"x" * 100))
    assert engine.handle(pkt[:80], 1.0).verdict is DROP
    assert engine.counters["truncated"] == 1 and engine.counters["malformed"] == 1


def big_tcp(packet: bytes) -> bytes:
    """`packet` as BIG TCP leaves a super-packet over 64 KB: its length field 0."""
    at = 2 if packet[0] >> 4 == 4 else 4
    return packet[:at] + b"\0\0" + packet[at + 2:]


TRUNCATIONS = {"copy-range": lambda packet: packet[:-4], "big-tcp": big_tcp}


@pytest.mark.parametrize("client", [CLIENT4, CLIENT6])
@pytest.mark.parametrize("cut", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_a_truncated_smtp_packet_is_dropped_unseen_and_judged_when_it_comes_whole(client, cut):
    conn = Conn(make_engine(), client=client, server=SERVER6 if ":" in client else "198.18.2.2")
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<a@b.example>\r\n")
    whole = conn.packet(True, b"RCPT TO:<x@external.example>\r\n" + b"NOOP\r\n" * 9000)
    decision = conn.feed(cut(whole))
    assert decision.verdict is DROP and decision.packet is None and not decision.inject
    assert not decision.notices and conn.engine.counters["truncated"] == 1
    # nothing of it counts as seen: the sender's resend is judged in full
    assert_refused(conn.feed(whole), conn, b"550")


@pytest.mark.parametrize("port, login", [
    (110, [b"USER alice\r\n", b"+OK\r\n", b"PASS secret\r\n"]),
    (143, [b"a1 LOGIN alice secret\r\n"]),
], ids=["pop3", "imap"])
@pytest.mark.parametrize("cut", TRUNCATIONS.values(), ids=TRUNCATIONS.keys())
def test_a_truncated_pop3_or_imap_packet_lets_the_flow_go_and_teaches_nothing(port, login, cut):
    engine = make_engine()
    conn = Conn(engine, sport=port)
    conn.handshake()
    conn.server(b"+OK Dovecot ready.\r\n" if port == 110 else b"* OK [CAPABILITY IMAP4rev1] ready\r\n")
    for i, line in enumerate(login):
        (conn.client if i % 2 == 0 else conn.server)(line)
    success = b"+OK Logged in.\r\n" if port == 110 else b"a1 OK Logged in\r\n"
    decision = conn.feed(cut(conn.packet(False, success + b"x" * 60000)))
    assert decision.verdict is BYPASS and decision.packet is None
    assert notices(decision, "error") and not notices(decision, "login")
    assert not engine.logins.is_logged_in(CLIENT4, conn.now)
    # the rest of the flow leaves too, whole or not
    assert conn.feed(conn.packet(False, success)).verdict is BYPASS
    assert not engine.logins.is_logged_in(CLIENT4, conn.now)


def data_phase(conn: Conn) -> None:
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<dave@external.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n")
    conn.client(b"RCPT TO:<alice@lab.example>\r\n")
    conn.server(b"250 2.1.5 Ok\r\n")
    conn.client(b"DATA\r\n")
    conn.server(b"354 End data with <CR><LF>.<CR><LF>\r\n")


SUPER = (b"y" * 998 + b"\r\n") * 60  # a 60 KB super-packet of message text


def test_a_stream_near_its_limit_asks_the_receiver_for_an_ack():
    # The server's ACKs went by the queue (the rules let most pure ACKs by): the
    # engine keeps every byte it passed, and past half the limit asks the server
    # how far it got, with a byte it had before.
    conn = Conn(make_engine())
    data_phase(conn)
    asked = []
    for _ in range(MAX_UNACKED // len(SUPER) - 1):
        sent_from = conn.cseq
        decision = conn.client(SUPER)
        assert decision.verdict is ACCEPT
        if decision.inject:
            [probe] = map(parse, decision.inject)
            assert (probe.src, probe.dst, probe.dport) == (conn.client_addr, conn.server_addr, 25)
            assert probe.seq == sent_from - 1 and probe.payload == b"\n" and probe.flags == ACK
            asked.append(sent_from)
    assert len(asked) == 4 and conn.engine.counters["ack_requests"] == 4  # 2 MiB on, every 512 KiB
    # no answer came: the segment over the limit is dropped, and each resend asks again
    while conn.client(SUPER).verdict is ACCEPT:
        pass
    for _ in range(3):
        dropped = conn.client(SUPER)
        assert dropped.verdict is DROP and conn.engine.counters["held_back"] >= 1
        [probe] = map(parse, dropped.inject)
        assert probe.seq == conn.cseq - 1 and len(probe.payload) == 1
    # the answer frees what the server has: the resend passes, and no more asking
    conn.feed(conn.packet(False, flags="A", ack=conn.cseq, options=[("SAck", (0, 1))]))
    passed = conn.client(SUPER)
    assert passed.verdict is ACCEPT and not passed.inject


def test_never_asks_with_a_byte_the_gate_rewrote():
    conn = Conn(make_engine(refusal="recipient"))
    data_phase(conn)
    session = conn.engine.flows.get((conn.client_addr, conn.cport, conn.server_addr, 25)).app
    session.refusals = Refusals()
    session.refusals.client.append((0, b"\0" * (MAX_UNACKED * 2)))  # say every byte was rewritten
    for _ in range(MAX_UNACKED // len(SUPER) - 1):
        assert not conn.client(SUPER).inject
    assert conn.engine.counters["ack_requests"] == 0


def test_other_ports_are_not_judged():
    engine = make_engine()
    pkt = bytes(IP(src="198.18.1.2", dst="198.18.2.2") / TCP(sport=1234, dport=80, flags="S"))
    assert engine.handle(pkt, 1.0).verdict is ACCEPT


def test_ipv6_relay_refused_and_login_learned():
    engine = make_engine()
    pop = Conn(engine, client=CLIENT6, server=SERVER6, sport=110)
    pop.pop3_login()
    assert engine.logins.is_logged_in(CLIENT6, pop.now)
    smtp = Conn(engine, client="2001:db8:1::99", server=SERVER6, now=pop.now)
    smtp.smtp_greeting()
    assert_refused(smtp.client(RELAY), smtp, b"550")
    ok = Conn(engine, client=CLIENT6, server=SERVER6, cport=40005, now=pop.now)
    ok.smtp_greeting()
    assert ok.client(RELAY).verdict is ACCEPT


def test_a_closed_connection_can_be_reopened_from_the_same_port():
    engine = make_engine()
    conn = Conn(engine)
    conn.smtp_greeting()
    conn.client(b"QUIT\r\n")
    conn.server(b"221 Bye\r\n", flags="FPA")
    conn.client(b"", flags="FA")
    conn.server(b"", flags="A")
    again = Conn(engine)
    again.cseq = 777777
    assert again.handshake()[0].verdict is ACCEPT
    assert again.client(b"EHLO x\r\n").verdict is ACCEPT


def test_a_blind_syn_on_a_live_sessions_ports_does_not_end_it():
    conn = Conn(make_engine())
    conn.smtp_greeting()
    conn.client(b"MAIL FROM:<alice@lab.example>\r\n")
    conn.server(b"250 2.1.0 Ok\r\n")
    d = conn.feed(conn.packet(True, flags="S", seq=conn.cseq + 99999, ack=0))
    assert d.verdict is ACCEPT and not d.inject  # the server answers with a challenge ACK
    assert conn.client(b"RCPT TO:<bob@lab.example>\r\n").verdict is ACCEPT
    conn.server(b"250 2.1.5 Ok\r\n")
    assert_refused(conn.client(b"RCPT TO:<dave@external.example>\r\n"), conn, b"550 5.7.1")
    assert conn.engine.counters["conflicts"] == 0


def test_reconfigure_keeps_flows_and_logins():
    engine = make_engine()
    Conn(engine, sport=110).pop3_login()
    conn = Conn(engine, cport=40003, now=2000.0)
    conn.smtp_greeting()
    fresh = make_engine(smtp_starttls="relay-clients")
    engine.reconfigure(fresh.config, engine.policy)
    assert engine.config.smtp_starttls == "relay-clients"
    assert conn.client(RELAY).verdict is ACCEPT


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=120)), max_size=12))
def test_any_bytes_on_a_tracked_flow_give_a_verdict_never_an_exception(chunks):
    conn = Conn(make_engine())
    conn.smtp_greeting()
    for from_client, data in chunks:
        d = conn.client(data) if from_client else conn.server(data)
        assert d.verdict in (ACCEPT, DROP, BYPASS)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_any_packet_bytes_give_a_verdict(data):
    engine = make_engine()
    assert engine.handle(data, 1.0).verdict in (ACCEPT, DROP, BYPASS)


def test_a_failing_login_store_loses_the_login_not_the_session():
    engine = make_engine()

    class Broken(type(engine.logins)):
        def add(self, *args, **kwargs):
            raise StoreError("disk full")

    engine.logins = Broken()
    d = Conn(engine, sport=110).pop3_login()
    assert d.verdict is BYPASS
    assert [n.event for n in d.notices] == ["error"] and "disk full" in d.notices[0].reason


def test_a_client_refused_once_can_reconnect_from_the_same_port():
    engine = make_engine()
    conn = Conn(engine)
    conn.smtp_greeting()
    assert conn.client(RELAY).verdict is DROP
    again = Conn(engine)  # same addresses and ports, a new ISN
    again.cseq = 900000
    assert [d.verdict for d in again.handshake()] == [ACCEPT, ACCEPT, ACCEPT]
    again.server(b"220 mx ESMTP\r\n")
    assert again.client(b"EHLO c\r\n").verdict is ACCEPT
    assert_refused(again.client(RELAY), again, b"550")


def test_a_refused_flow_is_kept_as_long_as_a_closed_one():
    engine = make_engine()
    conn = Conn(engine)
    conn.smtp_greeting()
    assert conn.client(RELAY).verdict is DROP
    # its stragglers are still reset meanwhile
    assert conn.client(b"QUIT\r\n").inject and len(engine.flows) == 1
    assert engine.flows.expire(conn.now + engine.flows.closed_timeout - 1) == []
    assert engine.flows.expire(conn.now + engine.flows.closed_timeout) != []
    assert len(engine.flows) == 0


def test_a_new_connection_on_a_settled_flows_ports_is_inspected_again():
    engine = make_engine(smtp_starttls="relay-clients")
    engine.logins.add(CLIENT4, "alice", 1000.0, 60)
    tls = Conn(engine, now=1000.0)
    tls.handshake()
    tls.server(b"220 mx ESMTP\r\n")
    tls.client(b"EHLO c\r\n")
    tls.server(b"250-mx\r\n250 STARTTLS\r\n")
    tls.client(b"STARTTLS\r\n")
    assert tls.server(b"220 2.0.0 Ready to start TLS\r\n").verdict is BYPASS
    # The login window closes; the client reconnects from the same port.
    again = Conn(engine, now=1100.0)
    again.cseq = 900000
    assert again.handshake()[0].verdict is ACCEPT
    again.server(b"220 mx ESMTP\r\n")
    again.client(b"EHLO c\r\n")
    assert_refused(again.client(RELAY), again, b"550")
