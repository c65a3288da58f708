"""One recipient refused in place: the rewrite, and the engine carrying it out."""

from __future__ import annotations

import pytest
from engine_helpers import Conn, make_engine
from hypothesis import assume, given
from hypothesis import strategies as st

from sapd_nfq.engine import smtp_grammar as grammar
from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.packet import RST, parse
from sapd_nfq.engine.policy import ROW_NOT_LOGGED_IN
from sapd_nfq.engine.refusal import REPLY, command, reply
from sapd_nfq.engine.verdicts import ACCEPT, DROP

# Every verb Postfix or Sendmail implements: the rewritten command must be none.
KNOWN_VERBS = {b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT",
               b"VRFY", b"EXPN", b"HELP", b"ETRN", b"AUTH", b"STARTTLS", b"XCLIENT",
               b"XFORWARD", b"VERB", b"ONEX", b"XUSR", b"CONNECT", b"GET", b"POST"}

LOCAL, OUTSIDE = b"RCPT TO:<alice@lab.example>\r\n", b"RCPT TO:<dave@external.example>\r\n"
MAIL = b"MAIL FROM:<alice@lab.example>\r\n"
POSTFIX_500 = b"500 5.5.2 Error: command not recognized\r\n"

_atom = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-+_=", min_size=1, max_size=40)
rcpt_lines = st.builds(
    lambda verb, ws, local, domain, params: b"%s%sTO:<%s@%s>%s" % (
        verb, ws, local.encode(), domain.encode(), params),
    st.sampled_from([b"RCPT", b"rcpt", b"Rcpt"]), st.sampled_from([b" ", b"\t", b"  "]),
    _atom, st.from_regex(r"[a-z0-9]{1,20}(\.[a-z]{2,6}){1,3}", fullmatch=True),
    st.sampled_from([b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;x@y.example"]))


@given(rcpt_lines | st.binary(max_size=200).map(lambda b: b"RCPT TO:" + b.replace(b"\n", b"")))
def test_the_mta_reads_a_same_length_command_it_does_not_know_and_no_address(line):
    try:
        grammar.rcpt_to(grammar.split_command(line)[1])  # a RCPT the gate would judge
    except ProtocolError:
        assume(False)
    rewritten = command(len(line))
    assert len(rewritten) == len(line)
    verb, args = grammar.split_command(rewritten)
    assert verb not in KNOWN_VERBS and verb[:1].isalpha()
    assert not set(rewritten) & set(b"@<>:%!\r\n\0 \t")  # no path, nothing Postfix splits on
    with pytest.raises(ProtocolError):
        grammar.rcpt_to(args)


@given(st.integers(1, 4096))
def test_any_length_gives_an_unknown_verb_of_that_length(length):
    rewritten = command(length)
    assert len(rewritten) == length and rewritten.isalpha() or b"-" in rewritten


reply_lines = st.lists(
    st.tuples(st.sampled_from([b"500", b"501", b"502", b"550", b"421", b"554"]),
              st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
              st.sampled_from([b"\r\n", b"\n"])),
    min_size=1, max_size=4)


def _reply_bytes(lines) -> bytes:
    return b"".join(code + (b"-" if i < len(lines) - 1 else b" ") + text + end
                    for i, (code, text, end) in enumerate(lines))


@given(reply_lines, st.data())
def test_any_mta_reply_becomes_a_550_of_the_same_shape_however_it_is_split(lines, data):
    original = _reply_bytes(lines)
    whole, _ = reply(original, 0)
    assert len(whole) == len(original)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(original)), max_size=6)))
    pieces, column, at = [], 0, 0
    for cut in [*cuts, len(original)]:
        piece, column = reply(original[at:cut], column)
        pieces.append(piece)
        at = cut
    assert b"".join(pieces) == whole  # split or retransmitted: the same bytes
    out = whole.split(b"\n")[:-1]
    assert len(out) == len(lines)
    for i, line in enumerate(out):
        code, final, text, _ = grammar.reply(line.rstrip(b"\r"))
        assert code == b"550" and final == (i == len(lines) - 1)
        assert (REPLY[4:] + b" " * 200).startswith(text) or text.startswith(REPLY[4:])


def test_postfix_s_500_is_exactly_the_550_s_length():
    assert reply(POSTFIX_500, 0)[0] == REPLY + b"\r\n"


# --- the engine ---------------------------------------------------------------

def _session(**config) -> Conn:
    conn = Conn(make_engine(refusal="recipient", **config))
    conn.smtp_greeting()
    return conn


def payload(decision, sent: bytes) -> bytes:
    return parse(decision.packet).payload if decision.packet is not None else sent


def test_one_segment_local_refused_local_only_the_refused_is_overwritten():
    conn = _session()
    burst = MAIL + LOCAL + OUTSIDE + LOCAL.replace(b"alice", b"bob")
    d = conn.client(burst)
    assert d.verdict is ACCEPT and not d.inject
    to_mta = payload(d, burst)
    assert len(to_mta) == len(burst)
    at = burst.index(OUTSIDE)
    assert to_mta[:at] == burst[:at] and to_mta[at + len(OUTSIDE):] == burst[at + len(OUTSIDE):]
    assert to_mta[at:at + len(OUTSIDE)] == command(len(OUTSIDE) - 2) + b"\r\n"
    assert [(n.event, n.recipient) for n in d.notices] == [
        ("pass", "alice@lab.example"), ("fail", "dave@external.example"), ("pass", "bob@lab.example")]
    [fail] = [n for n in d.notices if n.event == "fail"]
    assert fail.row == ROW_NOT_LOGGED_IN
    assert conn.engine.counters["fail"] == 1 and conn.engine.counters["pass"] == 2

    replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + POSTFIX_500 + b"250 2.1.5 Ok\r\n"
    d = conn.server(replies)
    assert d.verdict is ACCEPT
    assert payload(d, replies) == replies.replace(POSTFIX_500, REPLY + b"\r\n")
    # the transaction goes on
    assert conn.client(b"DATA\r\n").verdict is ACCEPT
    assert conn.server(b"354 End data with <CR><LF>.<CR><LF>\r\n").packet is None


def test_a_reply_split_at_every_byte_reads_the_same():
    conn = _session()
    conn.client(MAIL + OUTSIDE)
    conn.server(b"250 2.1.0 Ok\r\n")
    seen = b""
    for i in range(len(POSTFIX_500)):
        d = conn.server(POSTFIX_500[i:i + 1])
        assert d.verdict is ACCEPT
        seen += payload(d, POSTFIX_500[i:i + 1])
    assert seen == REPLY + b"\r\n"


def test_retransmissions_are_rewritten_identically_and_compared_with_the_client_s_bytes():
    conn = _session()
    seq = conn.cseq
    burst = MAIL + OUTSIDE + LOCAL
    first = conn.client(burst)
    again = conn.feed(conn.packet(True, burst, seq=seq))
    assert again.verdict is ACCEPT and again.packet == first.packet
    # a resend of part of it, from inside the refused line
    part = conn.feed(conn.packet(True, burst[40:], seq=seq + 40))
    assert parse(part.packet).payload == parse(first.packet).payload[40:]
    # the rewritten bytes are not what the client sent: a conflict
    forged = conn.feed(conn.packet(True, parse(first.packet).payload, seq=seq))
    assert forged.verdict is DROP

    conn = _session()
    conn.client(MAIL + OUTSIDE)
    sseq = conn.sseq
    replies = b"250 2.1.0 Ok\r\n" + POSTFIX_500
    first = conn.server(replies)
    assert conn.feed(conn.packet(False, replies, seq=sseq)).packet == first.packet


def test_a_refused_rcpt_on_a_fast_open_syn_is_rewritten_where_it_is():
    # A SYN's data starts one past its seq: the rewrite must land on the RCPT, or
    # the MTA reads the refused recipient as sent (seen in the lab with TFO on).
    conn = Conn(make_engine(refusal="recipient"))
    burst = b"EHLO c\r\n" + MAIL + OUTSIDE
    syn = conn.packet(True, burst, flags="S", ack=0)
    d = conn.feed(syn)
    assert d.verdict is ACCEPT and [n.event for n in d.notices] == ["fail"]
    at = burst.index(OUTSIDE)
    assert payload(d, burst) == burst[:at] + command(len(OUTSIDE) - 2) + b"\r\n"


def test_a_refused_line_begun_in_an_earlier_segment_falls_back_to_the_session_refusal():
    conn = _session()
    conn.client(MAIL + OUTSIDE[:12])  # already passed to the MTA as sent
    d = conn.client(OUTSIDE[12:])
    assert d.verdict is DROP and d.inject
    assert parse(d.inject[0]).payload.startswith(b"550 5.7.1")


def test_an_mta_that_accepts_the_rewritten_command_gets_the_session_refused():
    conn = _session()
    conn.client(MAIL + OUTSIDE)
    d = conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert d.verdict is DROP and any(parse(p).flags & RST for p in d.inject)
    assert [n.reason for n in d.notices if n.event == "reset"] == [
        "the MTA accepted the command a refused RCPT became"]


def test_a_multiline_reply_stays_multiline_every_line_550():
    conn = _session()
    conn.client(MAIL + OUTSIDE)
    replies = b"250 2.1.0 Ok\r\n500-5.5.1 Command unrecognized\r\n500 5.5.1 \"XSAPD\"\r\n"
    d = conn.server(replies)
    out = payload(d, replies).split(b"\r\n")
    assert out[1].startswith(b"550-5.7.1 ") and out[2].startswith(b"550 5.7.1 ")
    assert len(payload(d, replies)) == len(replies)


def test_refusal_session_keeps_the_old_refusal():
    conn = Conn(make_engine(refusal="session"))
    conn.smtp_greeting()
    d = conn.client(MAIL + OUTSIDE + LOCAL)
    assert d.verdict is DROP and parse(d.inject[0]).payload.startswith(b"550 5.7.1")
