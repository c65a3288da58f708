"""One recipient refused in place: the forms per MTA, the MTA told apart, and
the engine carrying the rewrite out."""

from __future__ import annotations

import pytest
from engine_helpers import Conn, make_engine
from hypothesis import assume, given
from hypothesis import strategies as st
from streams import conversation_splits, splits

from sapd_nfq.engine import smtp_grammar as grammar
from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.packet import RST, parse
from sapd_nfq.engine.policy import ROW_NOT_LOGGED_IN
from sapd_nfq.engine.refusal import FORMS, MTA, REPLY, SHORT_REPLY, SNIFF_LIMIT, Recognizer, reply
from sapd_nfq.engine.verdicts import ACCEPT, DROP

# Every verb Postfix, Sendmail or Exim implements: the unknown verb must be none.
KNOWN_VERBS = {b"HELO", b"EHLO", b"MAIL", b"RCPT", b"DATA", b"BDAT", b"RSET", b"NOOP", b"QUIT",
               b"VRFY", b"EXPN", b"HELP", b"ETRN", b"AUTH", b"STARTTLS", b"XCLIENT",
               b"XFORWARD", b"VERB", b"ONEX", b"XUSR", b"CONNECT", b"GET", b"POST", b"ATRN"}

LOCAL, OUTSIDE = b"RCPT TO:<alice@lab.example>\r\n", b"RCPT TO:<dave@external.example>\r\n"
MAIL = b"MAIL FROM:<alice@lab.example>\r\n"
POSTFIX_500 = b"500 5.5.2 Error: command not recognized\r\n"

# What each MTA says first and answers EHLO with, as seen in the lab (Debian 12's
# Postfix 3.7 with the lab's banner, Sendmail 8.17.1, Exim 4.96), and what it
# answers its form of the refused line with.
GREETINGS = {
    MTA.POSTFIX: (b"220 mx.lab.example ESMTP\r\n",
                  b"250-mx.lab.example\r\n250-PIPELINING\r\n250-ENHANCEDSTATUSCODES\r\n"
                  b"250 CHUNKING\r\n"),
    MTA.SENDMAIL: (b"220 mx2.lab.example ESMTP Sendmail 8.17.1/8.17.1; Sun, 6 Dec 2026 10:00:00"
                   b" GMT\r\n",
                   b"250-mx2.lab.example Hello client.lab.example [198.18.1.2], pleased to meet"
                   b" you\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250 HELP\r\n"),
    MTA.EXIM: (b"220 mx3.lab.example ESMTP Exim 4.96 Sun, 06 Dec 2026 10:00:00 +0000\r\n",
               b"250-mx3.lab.example Hello client.lab.example [198.18.1.2]\r\n250-PIPELINING\r\n"
               b"250-CHUNKING\r\n250 HELP\r\n"),
    MTA.OTHER: (b"220 mail.example.net ready\r\n",
                b"250-mail.example.net at your service\r\n250 PIPELINING\r\n"),
}


def answer(mta: MTA, line: bytes) -> bytes:
    """The MTA's answer to its form of a refused RCPT line (without CRLF)."""
    if mta is MTA.POSTFIX:
        return b"250 2.0.0 Ok\r\n"
    if mta is MTA.SENDMAIL:
        return b'504 5.3.0 HELP topic "%s" unknown\r\n' % line[5:15].lower()
    if mta is MTA.EXIM:
        return b"501 %s: recipient address must contain a domain\r\n" % line[8:]
    return POSTFIX_500


_atom = st.text("abcdefghijklmnopqrstuvwxyz0123456789.-+_=", min_size=1, max_size=40)
rcpt_lines = st.builds(
    lambda verb, ws, local, domain, params: b"%s%sTO:<%s@%s>%s" % (
        verb, ws, local.encode(), domain.encode(), params),
    st.sampled_from([b"RCPT", b"rcpt", b"Rcpt"]), st.sampled_from([b" ", b"\t", b"  "]),
    _atom, st.from_regex(r"[a-z0-9]{1,20}(\.[a-z]{2,6}){1,3}", fullmatch=True),
    st.sampled_from([b"", b" NOTIFY=NEVER", b" ORCPT=rfc822;x@y.example"]))
any_rcpt = rcpt_lines | st.binary(max_size=200).map(lambda b: b"RCPT TO:" + b.replace(b"\n", b""))


def _judged(line: bytes) -> None:
    try:
        grammar.rcpt_to(grammar.split_command(line)[1])  # a RCPT the gate would judge
    except ProtocolError:
        assume(False)


@given(any_rcpt)
def test_every_form_is_a_same_length_line_the_mta_takes_no_recipient_from(line):
    _judged(line)
    for mta, form in FORMS.items():
        rewritten = form.command(len(line))
        assert len(rewritten) == len(line)
        assert rewritten.startswith(form.head)
        assert not set(rewritten[len(form.head):]) & set(b"@<>:%!\r\n\0 \t")
        verb, args = grammar.split_command(rewritten)
        if mta is MTA.EXIM:  # a RCPT of a bare local part: every MTA wants a domain here
            assert verb == b"RCPT" and "@" not in grammar.rcpt_to(args)[0]
        elif mta is MTA.OTHER:
            assert verb not in KNOWN_VERBS and verb[:1].isalpha()
        else:
            assert verb == form.head.strip()
            with pytest.raises(ProtocolError):
                grammar.rcpt_to(args)


def test_the_shortest_rcpt_line_still_holds_each_form_s_verb():
    shortest = b"RCPT TO:x"
    grammar.rcpt_to(grammar.split_command(shortest)[1])
    for form in FORMS.values():
        assert form.command(len(shortest))[:len(form.head)] == form.head


@pytest.mark.parametrize("mta", list(MTA))
def test_each_mta_s_answer_has_room_for_its_form_s_text(mta):
    # the shortest line the grammar reads with brackets, and a long one
    for line in (b"RCPT TO:<a@b>", OUTSIDE[:-2]):
        command = FORMS[mta].command(len(line))
        original = answer(mta, command)
        text = FORMS[mta].text
        assert len(original) - 2 >= len(text), (mta, original)
        rewritten, _ = reply(original, 0, text)
        assert rewritten.rstrip(b"\r\n").rstrip(b" ") == text
        assert b"log in" in text.lower()


def test_postfix_s_noop_answer_is_exactly_the_short_text_and_a_space():
    assert reply(b"250 2.0.0 Ok\r\n", 0, SHORT_REPLY)[0] == SHORT_REPLY + b" \r\n"
    assert reply(POSTFIX_500, 0, REPLY)[0] == REPLY + b"\r\n"


reply_lines = st.lists(
    st.tuples(st.sampled_from([b"250", b"214", b"500", b"501", b"504", b"421"]),
              st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"")),
              st.sampled_from([b"\r\n", b"\n"])),
    min_size=1, max_size=4)


def _reply_bytes(lines) -> bytes:
    return b"".join(code + (b"-" if i < len(lines) - 1 else b" ") + text + end
                    for i, (code, text, end) in enumerate(lines))


@given(reply_lines, st.sampled_from([REPLY, SHORT_REPLY]), st.data())
def test_any_mta_reply_becomes_a_550_of_the_same_shape_however_it_is_split(lines, text, data):
    original = _reply_bytes(lines)
    whole, _ = reply(original, 0, text)
    assert len(whole) == len(original)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(original)), max_size=6)))
    pieces, column, at = [], 0, 0
    for cut in [*cuts, len(original)]:
        piece, column = reply(original[at:cut], column, text)
        pieces.append(piece)
        at = cut
    assert b"".join(pieces) == whole  # split or retransmitted: the same bytes
    out = whole.split(b"\n")[:-1]
    assert len(out) == len(lines)
    for i, line in enumerate(out):
        code, final, rest, _ = grammar.reply(line.rstrip(b"\r"))
        assert code == b"550" and final == (i == len(lines) - 1)
        assert (text[4:] + b" " * 200).startswith(rest) or rest.startswith(text[4:])


def test_only_a_form_that_could_name_a_recipient_must_be_refused():
    assert FORMS[MTA.POSTFIX].refused("250") and FORMS[MTA.SENDMAIL].refused("214")
    assert not FORMS[MTA.EXIM].refused("250") and not FORMS[MTA.OTHER].refused("250")
    assert all(form.refused("501") and form.refused("421") for form in FORMS.values())


# --- telling the MTA apart ------------------------------------------------------

@pytest.mark.parametrize("mta", list(MTA))
def test_the_mta_is_told_from_its_first_lines_however_they_are_cut(mta):
    greeting, ehlo = GREETINGS[mta]
    for chunks in splits(greeting + ehlo):
        recognizer = Recognizer()
        for chunk in chunks:
            recognizer.feed(chunk)
        assert recognizer.mta is mta


@pytest.mark.parametrize(("greeting", "ehlo", "mta"), [
    (b"220 mx ESMTP Postfix (Debian/GNU)\r\n", b"", MTA.POSTFIX),      # the greeting suffices
    (b"220-mx ESMTP Exim 4.96\r\n220 no relaying\r\n", b"", MTA.EXIM),  # multiline greeting
    (b"220 mx ESMTP exim or postfix\r\n", b"250-mx\r\n", MTA.POSTFIX),  # two names: EHLO tells
    (b"220 mx ready\r\n", b"250-mx Hello [198.18.1.2]\r\n", MTA.EXIM),
    (b"220 mx ready\r\n", b"250 mx Hello c [1.2.3.4], pleased to meet you\r\n", MTA.SENDMAIL),
    (b"220 mx ready\r\n", b"502 5.5.1 no EHLO\r\n", MTA.OTHER),
    (b"554 go away\r\n", b"", MTA.OTHER),
    (b"220 mx ready\r\n", b"", None),                                  # not told yet
])
def test_what_tells_the_mta(greeting, ehlo, mta):
    recognizer = Recognizer()
    recognizer.feed(greeting + ehlo)
    assert recognizer.mta is mta


def test_nothing_told_within_the_limit_is_other():
    recognizer = Recognizer()
    recognizer.feed(b"220-" + b"x" * (SNIFF_LIMIT + 100))
    assert recognizer.mta is MTA.OTHER
    recognizer.feed(b"\r\n220 mx ESMTP Postfix\r\n")
    assert recognizer.mta is MTA.OTHER


# --- the engine ---------------------------------------------------------------

def _session(shows: MTA = MTA.POSTFIX, **config) -> Conn:
    """A session past EHLO with the greeting and EHLO reply of `shows`."""
    conn = Conn(make_engine(refusal="recipient", **config))
    conn.handshake()
    greeting, ehlo = GREETINGS[shows]
    conn.server(greeting)
    conn.client(b"EHLO client.lab.example\r\n")
    conn.server(ehlo)
    return conn


def payload(decision, sent: bytes) -> bytes:
    return parse(decision.packet).payload if decision.packet is not None else sent


def _cut_inside(chunks, skip: int, spans) -> bool:
    """Whether the client chunks, past its first `skip` bytes, cut a span in two."""
    at = -skip
    for from_client, chunk in chunks:
        if from_client:
            at += len(chunk)
            if any(first < at < last for first, last in spans):
                return True
    return False


@pytest.mark.parametrize("mta", list(MTA))
def test_a_pipelined_transaction_at_every_cut_reads_the_same_to_each_side(mta):
    """Each side reads the same bytes however both streams are cut, except
    that a refused line cut in two goes to the session refusal (its start
    has gone on to the MTA as sent)."""
    refused = [OUTSIDE, b"RCPT TO:<erin@elsewhere.example> NOTIFY=NEVER\r\n"]
    burst = MAIL + LOCAL + refused[0] + refused[1] + LOCAL.replace(b"alice", b"bob") + b"DATA\r\n"
    spans = [(burst.index(line), burst.index(line) + len(line)) for line in refused]
    form = FORMS[mta]
    forms = [form.command(len(line) - 2) + b"\r\n" for line in refused]
    to_mta = burst.replace(refused[0], forms[0]).replace(refused[1], forms[1])
    answers = [answer(mta, line[:-2]) for line in forms]
    replies = (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n" + answers[0] + answers[1] + b"250 2.1.5 Ok\r\n"
               + b"354 End data with <CR><LF>.<CR><LF>\r\n")
    to_client = replies
    for original in answers:
        to_client = to_client.replace(original, reply(original, 0, form.text)[0])
    greeting, ehlo = GREETINGS[mta]
    ehlo_cmd = b"EHLO client.lab.example\r\n"
    steps = [(False, greeting), (True, ehlo_cmd), (False, ehlo), (True, burst), (False, replies)]
    for chunks in conversation_splits(steps):
        cut_inside = _cut_inside(chunks, len(ehlo_cmd), spans)
        conn = Conn(make_engine(refusal="recipient"))
        conn.handshake()
        seen = {True: b"", False: b""}
        for from_client, chunk in chunks:
            d = conn.client(chunk) if from_client else conn.server(chunk)
            if d.verdict is DROP:
                assert cut_inside and from_client, (mta, chunks)
                assert parse(d.inject[0]).payload.startswith(b"550 5.7.1"), (mta, chunks)
                break
            assert d.verdict is ACCEPT and not d.inject, (mta, chunks)
            seen[from_client] += payload(d, chunk)
        else:
            assert not cut_inside, (mta, chunks)
            assert seen[True] == ehlo_cmd + to_mta, mta
            assert seen[False] == greeting + ehlo + to_client, mta
            assert conn.engine.counters["fail"] == 2 and conn.engine.counters["pass"] == 2


@pytest.mark.parametrize("mta", list(MTA))
def test_the_config_names_the_mta_whatever_the_session_shows(mta):
    shows = MTA.EXIM if mta is MTA.POSTFIX else MTA.POSTFIX
    conn = _session(shows, mta=mta.value)
    burst = MAIL + OUTSIDE
    d = conn.client(burst)
    assert payload(d, burst)[len(MAIL):] == FORMS[mta].command(len(OUTSIDE) - 2) + b"\r\n"


def test_a_refusal_before_the_mta_is_told_uses_the_unknown_verb():
    conn = Conn(make_engine(refusal="recipient"))
    conn.handshake()
    conn.server(b"220 mx.lab.example ESMTP\r\n")
    burst = b"EHLO c\r\n" + MAIL + OUTSIDE  # pipelined before the EHLO reply
    d = conn.client(burst)
    assert payload(d, burst).endswith(FORMS[MTA.OTHER].command(len(OUTSIDE) - 2) + b"\r\n")


def test_one_segment_local_refused_local_only_the_refused_is_overwritten():
    conn = _session()
    burst = MAIL + LOCAL + OUTSIDE + LOCAL.replace(b"alice", b"bob")
    d = conn.client(burst)
    assert d.verdict is ACCEPT and not d.inject
    to_mta = payload(d, burst)
    assert len(to_mta) == len(burst)
    at = burst.index(OUTSIDE)
    assert to_mta[:at] == burst[:at] and to_mta[at + len(OUTSIDE):] == burst[at + len(OUTSIDE):]
    assert to_mta[at:at + len(OUTSIDE)] == b"NOOP XSAPD-REFUSED-RECIPIENTXXX\r\n"
    assert [(n.event, n.recipient) for n in d.notices] == [
        ("pass", "alice@lab.example"), ("fail", "dave@external.example"), ("pass", "bob@lab.example")]
    [fail] = [n for n in d.notices if n.event == "fail"]
    assert fail.row == ROW_NOT_LOGGED_IN

    replies = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n250 2.1.5 Ok\r\n"
    d = conn.server(replies)
    assert d.verdict is ACCEPT
    assert payload(d, replies) == replies.replace(b"250 2.0.0 Ok", b"550 Log in. ")
    # the transaction goes on
    assert conn.client(b"DATA\r\n").verdict is ACCEPT
    assert conn.server(b"354 End data with <CR><LF>.<CR><LF>\r\n").packet is None


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

    conn = _session(MTA.EXIM)
    conn.client(MAIL + OUTSIDE)
    sseq = conn.sseq
    replies = b"250 OK\r\n" + answer(MTA.EXIM, FORMS[MTA.EXIM].command(len(OUTSIDE) - 2))
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
    assert payload(d, burst) == burst[:at] + FORMS[MTA.OTHER].command(len(OUTSIDE) - 2) + b"\r\n"


def test_a_refused_line_begun_in_an_earlier_segment_falls_back_to_the_session_refusal():
    conn = _session()
    conn.client(MAIL + OUTSIDE[:12])  # already passed to the MTA as sent
    d = conn.client(OUTSIDE[12:])
    assert d.verdict is DROP and d.inject
    assert parse(d.inject[0]).payload.startswith(b"550 5.7.1")


@pytest.mark.parametrize("mta", [MTA.EXIM, MTA.OTHER])
def test_an_mta_that_accepts_a_rewritten_command_that_could_name_a_recipient_gets_the_session_refused(
        mta):
    conn = _session(mta)
    conn.client(MAIL + OUTSIDE)
    d = conn.server(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    assert d.verdict is DROP and any(parse(p).flags & RST for p in d.inject)
    assert [n.reason for n in d.notices if n.event == "reset"] == [
        "the MTA accepted the command a refused RCPT became"]


def test_a_multiline_reply_stays_multiline_every_line_550():
    conn = _session(MTA.SENDMAIL)
    conn.client(MAIL + OUTSIDE)
    replies = b"250 2.1.0 Ok\r\n214-2.0.0 This is sendmail\r\n214 2.0.0 End of HELP info\r\n"
    d = conn.server(replies)
    out = payload(d, replies).split(b"\r\n")
    assert out[1].startswith(b"550-5.7.1 ") and out[2].startswith(b"550 5.7.1 ")
    assert len(payload(d, replies)) == len(replies)


def test_refusal_session_keeps_the_old_refusal():
    conn = Conn(make_engine(refusal="session"))
    conn.smtp_greeting()
    d = conn.client(MAIL + OUTSIDE + LOCAL)
    assert d.verdict is DROP and parse(d.inject[0]).payload.startswith(b"550 5.7.1")
