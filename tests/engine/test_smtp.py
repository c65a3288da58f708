"""The SMTP machine, fed conversations cut every way TCP can cut them."""

from __future__ import annotations

import base64
import random
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from streams import conversation_splits, random_chunks, split_at, splits

from sapd_nfq.engine import smtp_grammar as grammar
from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.events import (
    DataStarted,
    LoginFailed,
    LoginSucceeded,
    MailFrom,
    MessageEnded,
    MessageQueued,
    Quit,
    RcptTo,
    SessionReset,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from sapd_nfq.engine.smtp import MAX_PENDING_BYTES, SMTPMachine

C, S = "client", "server"

GREETING = (S, b"220 mx.example.org ESMTP\r\n")
EHLO = (C, b"EHLO client.example.net\r\n")
EHLO_REPLY = (S, b"250-mx.example.org\r\n250-PIPELINING\r\n250-CHUNKING\r\n"
                 b"250-STARTTLS\r\n250 8BITMIME\r\n")
# The EHLO reply above offers STARTTLS at this server-stream offset.
STARTTLS_AT = len(GREETING[1]) + EHLO_REPLY[1].index(b"STARTTLS")
HELLO = [GREETING, EHLO, EHLO_REPLY]
HELLO_EVENTS = [SessionReset("EHLO"), TLSOffered(STARTTLS_AT, 8)]


def feed(pieces, machine=None):
    """Feed (side, chunk) pieces in order (to a new SMTPMachine by default).

    Returns (machine, [(event, side, start, end)], error) where start..end is
    the side's stream range of the call that returned the event, and error
    is (side, start, end, hint) of the call that raised, or None.
    """
    machine = machine or SMTPMachine()
    seen, offsets = [], {C: 0, S: 0}
    for side, chunk in pieces:
        start = offsets[side]
        offsets[side] += len(chunk)
        receive = machine.receive_client if side == C else machine.receive_server
        try:
            events = receive(chunk)
        except ProtocolError as exc:
            return machine, seen, (side, start, offsets[side], exc.hint)
        seen += [(event, side, start, offsets[side]) for event in events]
    return machine, seen, None


def completing_bytes(steps, machine=SMTPMachine):
    """Events and error of `steps`, each tagged with the side and offset of
    the byte that completes it (found by feeding one byte at a time)."""
    bytewise = [(side, data[i:i + 1]) for side, data in steps for i in range(len(data))]
    _, seen, error = feed(bytewise, machine())
    return [(e, side, start) for e, side, start, _ in seen], error and error[:2]


def check(steps, expected, *, error=False, trailing=b"", machine=SMTPMachine, cuts=conversation_splits):
    """Every cut of `steps` gives `expected`, each event from the call that
    fed its completing byte; `error` says the stream must end in
    ProtocolError. Trailing client bytes (an unfinished line) change nothing.
    `machine` makes each machine fed, `cuts` gives the ways to cut `steps`."""
    tagged, raised_at = completing_bytes(steps, machine)
    assert [e for e, _, _ in tagged] == expected
    assert (raised_at is not None) == error, raised_at
    for pieces in cuts(steps):
        machine_fed, seen, raised = feed(pieces, machine())
        if error:
            # the call that raises returns no events: drop those it completed
            side, start, end, _ = raised
            assert side == raised_at[0] and start <= raised_at[1] < end, pieces
            kept = [t for t in tagged if not (t[1] == side and start <= t[2] < end)]
        else:
            kept = tagged
        assert [e for e, *_ in seen] == [e for e, _, _ in kept], pieces
        for (_, side, at), (_, side2, start, end) in zip(kept, seen):
            assert side == side2 and start <= at < end, pieces
        if error:
            with pytest.raises(ProtocolError):
                machine_fed.receive_client(b"QUIT\r\n")
            with pytest.raises(ProtocolError):
                machine_fed.receive_server(b"250 ok\r\n")
        else:
            assert raised is None, raised
            if trailing:
                assert machine_fed.receive_client(trailing) == []
    return tagged


def events_of(steps):
    return [e for e, *_ in feed(steps)[1]]


# --- envelope grammar ----------------------------------------------------------

MAIL_OK = [
    (b"MAIL FROM:<a@b.example>", "a@b.example", ""),
    (b"MAIL FROM: <a@b.example>", "a@b.example", ""),
    (b"mail from:a@b.example", "a@b.example", ""),
    (b"Mail From:<Alice@B.Example>", "Alice@B.Example", ""),
    (b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", "a@b.example", "SIZE=1000 BODY=8BITMIME"),
    (b"MAIL FROM:<a@b.example> AUTH=<>", "a@b.example", "AUTH=<>"),
    (b"MAIL FROM:<>", "", ""),
    (b"MAIL FROM:<> SIZE=0", "", "SIZE=0"),
    (b'MAIL FROM:<"john doe"@ex.com>', '"john doe"@ex.com', ""),
    (b'MAIL FROM:"john doe"@ex.com', '"john doe"@ex.com', ""),
    (b"  MAIL\tFROM:\t<a@b.example>  ", "a@b.example", ""),
    (b"MAIL\x0bFROM:<a@b.example>", "a@b.example", ""),
    (b"MAIL FROM:<a@b.example>\r", "a@b.example", ""),  # CR CR LF: Postfix strips both
    (b"MAIL FROM:<a@b.example>\x0bSIZE=1\x0c", "a@b.example", "SIZE=1"),
    (b"MAIL FROM:<@relay.example:a@b.example>", "a@b.example", ""),
    (b"MAIL FROM:<a@[192.0.2.1]>", "a@[192.0.2.1]", ""),
    (b"MAIL FROM:<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", ""),
    (b"MAIL FROM:<j\xc3\xb6rg@ex.com> SMTPUTF8", "j\u00f6rg@ex.com", "SMTPUTF8"),
    (b"MAIL FROM:<first.last+tag@sub.b-c.example>", "first.last+tag@sub.b-c.example", ""),
]

RCPT_OK = [
    (b"RCPT TO:<victim@example.net>", "victim@example.net", ""),
    (b"RCPT TO: <x@y.example>", "x@y.example", ""),
    (b"rcpt to:x@y.example", "x@y.example", ""),
    (b"RCPT TO:<x@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.example",
     "x@y.example", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.example"),
    (b'RCPT TO:<"a>b"@ex.com>', '"a>b"@ex.com', ""),
    (b'RCPT TO:<"a\\"b"@ex.com>', '"a\\"b"@ex.com', ""),
    (b"RCPT TO:<@relay,@relay2:user@dom.example>", "user@dom.example", ""),
    (b"RCPT TO:<Postmaster>", "Postmaster", ""),
    (b"RCPT TO:<User@Example.COM>", "User@Example.COM", ""),
    # spellings Postfix delivers to the plain address, read as it
    (b'RCPT TO:<"alice"@lab.example>', "alice@lab.example", ""),
    (b'RCPT TO:"alice+tag"@lab.example', "alice+tag@lab.example", ""),
    (b'RCPT TO:<"al\\ice"@lab.example>', "alice@lab.example", ""),
    (b"RCPT TO:<alice@lab.example.>", "alice@lab.example", ""),
    (b"RCPT TO:<@relay.example.:alice@lab.example.>", "alice@lab.example", ""),
]

ENVELOPE_BAD = [
    b"MAIL FROM:", b"MAIL FROM<a@b.example>", b"MAIL TO:<a@b.example>", b"MAIL FROM:<a@b.example",
    b"RCPT TO:<>", b"RCPT TO:", b"RCPT <x@y.example>", b"RCPT TO :<x@y.example>",
    b"RCPT TO:<x@y.example>z", b"RCPT TO:<a@b.example>,<c@d.example>",
    b"RCPT TO:<a@b.example> <c@d.example>", b"RCPT TO:<a@b.example> SIZE==1",
    b"RCPT TO:<a @b.example>", b"RCPT TO:<a(comment)@b.example>", b"RCPT TO:<a..b@c.example>",
    b"RCPT TO:<a@b.example..>", b"RCPT TO:<a@.>", b"RCPT TO:<a@[192.0.2.1].>",
    b"RCPT TO:<a@-b.example>", b"RCPT TO:<a@b\xc3\xa9.example>",
    b"RCPT TO:<\xff@b.example>", b"RCPT TO:<a@b.example>\x00", b"RCPT TO:@r.example:a@b.example",
    # addresses the MTA may route elsewhere than they read
    b"RCPT TO:<victim%evil.example@us.example>", b"RCPT TO:<evil.example!victim@us.example>",
    b"RCPT TO:<a@b@us.example>", b'RCPT TO:<"victim@evil.example"@us.example>',
    b'RCPT TO:<"victim\\%evil.example"@us.example>',
]


@pytest.mark.parametrize(("line", "sender", "params"), MAIL_OK)
def test_mail_from(line, sender, params):
    check([GREETING, (C, line + b"\r\n")], [MailFrom(sender, params)],
          trailing=b"RCPT TO:<a@b")


@pytest.mark.parametrize(("line", "recipient", "params"), RCPT_OK)
def test_rcpt_to(line, recipient, params):
    check([GREETING, (C, b"MAIL FROM:<>\r\n" + line + b"\r\n")],
          [MailFrom(""), RcptTo(recipient, params)], trailing=b"RCPT TO:<a@b")


@pytest.mark.parametrize("line", ENVELOPE_BAD)
def test_unreadable_envelope_is_refused(line):
    prefix = b"" if line.startswith(b"MAIL") else b"MAIL FROM:<>\r\n"
    expected = [] if line.startswith(b"MAIL") else [MailFrom("")]
    check([GREETING, (C, prefix), (C, line + b"\r\n")], expected, error=True)


def test_bare_lf_ends_a_command():
    check([GREETING, (C, b"MAIL FROM:<a@b.example>\nRCPT TO:<x@y.example>\n")],
          [MailFrom("a@b.example"), RcptTo("x@y.example")])


@pytest.mark.parametrize("verb", [b"RCPT", b"rcpt", b"Rcpt"])
def test_verb_is_case_insensitive(verb):
    assert events_of([GREETING, (C, verb + b" TO:<x@y.example>\r\n")]) == [RcptTo("x@y.example")]


# --- pipelining and the reply queue --------------------------------------------

def test_pipelined_burst_with_replies():
    steps = HELLO + [
        (C, b"MAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\n"
            b"XYZZY\r\nDATA\r\n"),
        (S, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no\r\n502 5.5.2 what\r\n354 go\r\n"),
        (C, b"Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"),
        (S, b"250 2.0.0 Ok: queued as 4XkQ2B1c2Dz9\r\n221 2.0.0 Bye\r\n"),
    ]
    check(steps, HELLO_EVENTS + [
        MailFrom("a@b.example"), RcptTo("x@y.example"), RcptTo("z@y.example"),
        DataStarted(), MessageEnded(), Quit(), MessageQueued("4XkQ2B1c2Dz9"),
    ])


def test_multiline_greeting_and_early_commands():
    steps = [(C, b"EHLO early\r\n"), (S, b"220-mx.example.org\r\n220 ESMTP\r\n"),
             (S, b"250-mx.example.org\r\n250 STARTTLS\r\n")]
    offset = len(steps[1][1]) + steps[2][1].index(b"STARTTLS")
    check(steps, [SessionReset("EHLO"), TLSOffered(offset, 8)])


@pytest.mark.parametrize("reply", [
    b"250 ok\r\n",                        # nothing waits for it
    b"25 short\r\n", b"250x\r\n", b"250\tok\r\n", b"abc\r\n", b"\r\n", b"150 ok\r\n",
    b"650 ok\r\n",
])
def test_unexpected_or_malformed_reply(reply):
    check([GREETING, (S, reply)], [], error=True)


def test_multiline_reply_must_keep_its_code():
    check([GREETING, (C, b"NOOP\r\n"), (S, b"250-a\r\n251 b\r\n")], [], error=True)
    check([(S, b"220-a\r\n554 b\r\n")], [], error=True)


def test_greeting_must_be_a_final_code():
    check([(S, b"354 hi\r\n")], [], error=True)


def test_reply_lines_may_end_in_several_crs():
    check([GREETING, (C, b"DATA\r\n"), (S, b"354\r\r\n")], [DataStarted()])


@pytest.mark.parametrize(("command", "reply"), [
    (b"RCPT TO:<x@y.example>", b"354 go"), (b"NOOP", b"334 x"), (b"STARTTLS", b"250 ok"),
    (b"AUTH PLAIN", b"250 ok"), (b"DATA", b"334 x"),
])
def test_reply_that_does_not_answer_its_command(command, reply):
    steps = [GREETING, (C, command + b"\r\n"), (S, reply + b"\r\n")]
    check(steps, events_of(steps[:2]), error=True)


def test_greeting_needs_no_command_but_takes_the_first_reply():
    # 250 after the greeting, with nothing sent: no command waits for it
    check([(S, b"220 hi\r\n250 ok\r\n")], [], error=True)


# --- the reply queue's byte budget ----------------------------------------------

def burst_cuts(steps):
    """The cuts of `conversation_splits` that stay affordable for a burst of
    many kilobytes: whole, byte by byte, every step cut in two at a few
    offsets inside lines and at line ends, and seeded random chunkings."""
    yield from (list(steps), [(side, data[i:i + 1]) for side, data in steps for i in range(len(data))])
    longest = max(len(data) for _, data in steps)
    for k in (1, 37, 1000, longest // 2, longest - 1):
        yield [(side, chunk) for side, data in steps
               for chunk in (split_at(data, [k]) if 0 < k < len(data) else [data])]
    rng = random.Random(0)
    for _ in range(3):
        yield [(side, chunk) for side, data in steps for chunk in random_chunks(data, rng)]


def long_address(i: int) -> str:
    """A distinct address as long as RFC 5321 allows: local part 64 octets,
    path 256 with its brackets."""
    local = f"r{i:04d}-" + "x" * 58
    return local + "@" + ".".join(["d" * 62, "e" * 62, "f" * 55, "example"])


def pipelined_transaction(recipients, params=b"", rcpt_replies=None):
    """A session that pipelines MAIL, a RCPT to each recipient and DATA in one
    burst, then sends a message; with the events it must give."""
    replies = rcpt_replies or [b"250 2.1.5 Ok\r\n"] * len(recipients)
    burst = (b"MAIL FROM:<sender@example.net> BODY=8BITMIME\r\n"
             + b"".join(b"RCPT TO:<%s>%s\r\n" % (r.encode(), params) for r in recipients)
             + b"DATA\r\n")
    steps = HELLO + [(C, burst), (S, b"250 2.1.0 Ok\r\n" + b"".join(replies) + b"354 go\r\n"),
                     (C, b"Subject: many\r\n\r\nbody\r\n.\r\nQUIT\r\n"),
                     (S, b"250 2.0.0 queued\r\n221 2.0.0 Bye\r\n")]
    events = HELLO_EVENTS + [MailFrom("sender@example.net", "BODY=8BITMIME"),
                             *(RcptTo(r, params.decode().strip()) for r in recipients),
                             DataStarted(), MessageEnded(), Quit(), MessageQueued(None)]
    return steps, events


def test_a_thousand_pipelined_recipients_with_the_longest_paths_pass():
    recipients = [long_address(i) for i in range(1000)]
    assert all(len(f"<{r}>") == 256 for r in recipients)
    # the 354 answers DATA only if every earlier reply answered its own command
    replies = [b"550 5.1.1 no\r\n" if i % 7 == 3 else b"250-2.1.5 Ok\r\n250 2.1.5 go on\r\n"
               for i in range(1000)]
    steps, events = pipelined_transaction(
        recipients, b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;" + recipients[0].encode(), replies)
    assert len(steps[3][1]) > 500_000  # more than half the budget waits for replies
    check(steps, events, cuts=burst_cuts)


def test_a_thousand_recipients_then_one_reply_short_or_over():
    recipients = [f"user{i}@example.org" for i in range(1000)]
    steps, events = pipelined_transaction(recipients)
    replies = steps[4][1]
    short = replies.replace(b"250 2.1.5 Ok\r\n", b"", 1)   # the 354 then answers the last RCPT
    over = b"250 2.1.5 Ok\r\n" + replies                    # the 354 then answers nothing
    for bad in (short, over):
        _, seen, error = feed([*steps[:4], (S, bad)])
        assert error is not None and error[0] == S
        assert [e for e, *_ in seen] == events[:-4]


def test_a_burst_over_the_byte_budget_is_refused_at_the_line_that_crosses_it():
    line = b"RCPT TO:<%s>\r\n" % long_address(0).encode()
    fit = (MAX_PENDING_BYTES - 64) // len(line)  # after a MAIL, charged 64 bytes
    burst = b"MAIL FROM:<>\r\n" + line * (fit + 1)
    steps = HELLO + [(C, burst[:len(burst) - 1]), (C, burst[-1:])]
    machine = SMTPMachine()
    for side, data in steps[:-1]:
        (machine.receive_client if side == C else machine.receive_server)(data)
    with pytest.raises(ProtocolError, match="exceed"):
        machine.receive_client(steps[-1][1])
    # with MAIL and the first RCPT answered, the same line fits
    machine = SMTPMachine()
    for side, data in steps[:-1]:
        (machine.receive_client if side == C else machine.receive_server)(data)
    machine.receive_server(b"250 ok\r\n250 ok\r\n")
    assert len(machine.receive_client(steps[-1][1])) == 1


@pytest.mark.parametrize(("budget", "error"), [(64 + 68 + 68, False), (64 + 68 + 67, True)])
def test_the_budget_charges_each_line_its_bytes(budget, error):
    rcpt = b"RCPT TO:<" + b"r" * 44 + b"@example.org>\r\n"
    assert len(rcpt) == 68  # longer than a waiting command's own cost: charged its length
    steps = [GREETING, (C, b"MAIL FROM:<>\r\n" + rcpt + rcpt)]
    expected = [MailFrom(""), *[RcptTo("r" * 44 + "@example.org")] * (1 if error else 2)]
    check(steps, expected, error=error, machine=lambda: SMTPMachine(max_pending_bytes=budget))


def test_short_lines_are_charged_what_a_waiting_command_costs():
    steps = [GREETING, (C, b"NOOP\r\n" * 5)]
    check(steps, [], machine=lambda: SMTPMachine(max_pending_bytes=5 * 64))
    check(steps + [(C, b"\n")], [], error=True, machine=lambda: SMTPMachine(max_pending_bytes=5 * 64))


def test_replies_give_the_budget_back():
    rounds = [step for i in range(20) for step in (
        (C, b"MAIL FROM:<>\r\nRCPT TO:<a%d@example.org>\r\nRSET\r\n" % i),
        (S, b"250 ok\r\n550 no\r\n250 ok\r\n"))]
    expected = [e for i in range(20) for e in (MailFrom(""), RcptTo(f"a{i}@example.org"),
                                                SessionReset("RSET"))]
    check([GREETING, *rounds], expected, machine=lambda: SMTPMachine(max_pending_bytes=3 * 64))


def test_a_long_queue_of_transactions_is_followed_without_a_reply():
    # Each MAIL is judged against everything still waiting: RSET closes the
    # transaction whatever its reply; `RSET x` may fail and keep it open.
    many = b"MAIL FROM:<>\r\nRCPT TO:<a@example.org>\r\nRSET\r\n" * 3000
    assert len(events_of([GREETING, (C, many)])) == 9000
    _, seen, error = feed([GREETING, (C, b"NOOP\r\n" * 3000 + b"MAIL FROM:<>\r\nRSET x\r\n"
                                         b"MAIL FROM:<>\r\n")])
    assert [e for e, *_ in seen] == [] and error is not None
    _, seen, error = feed([GREETING, (C, many + b"MAIL FROM:<>\r\n"), (S, b"250 ok\r\n" * 9000),
                           (C, b"EHLO x\r\nMAIL FROM:<>\r\n")])
    assert error is not None and error[0] == C and len(seen) == 9001


# The transaction the MTA may have open, worked out the long way (every
# outcome of every waiting command), against the machine's shortcut.
TRANSACTION_MODEL = {  # command: (open after success, after failure); None keeps it
    b"MAIL FROM:<>": (True, None), b"RSET": (False, False), b"RSET x": (False, None),
    b"EHLO x": (False, None), b"HELO x": (False, None), b"NOOP": (None, None),
    b"RCPT TO:<a@b.example>": (None, None),
}


MAIL, RSET, RSET_X, NOOP = b"MAIL FROM:<>", b"RSET", b"RSET x", b"NOOP"


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(sorted(TRANSACTION_MODEL)), st.booleans()), max_size=60))
@example([MAIL, RSET, MAIL])
@example([MAIL, RSET_X, MAIL])
@example([MAIL, RSET, NOOP, MAIL])
@example([MAIL, RSET, True, RSET_X, MAIL])
@example([MAIL, True, RSET_X, False, MAIL])
@example([MAIL, RSET, MAIL, True, True, RSET, MAIL])
def test_nested_mail_is_found_as_a_walk_over_the_queue_finds_it(steps):
    """Each step is a command, or a reply (True: 250, False: 550) to the oldest waiting one."""
    machine = SMTPMachine()
    machine.receive_server(b"220 hi\r\n")
    is_open, waiting = False, []
    for step in steps:
        if isinstance(step, bool):
            if not waiting:
                continue
            after = TRANSACTION_MODEL[waiting.pop(0)][0 if step else 1]
            is_open = is_open if after is None else after
            machine.receive_server(b"250 ok\r\n" if step else b"550 no\r\n")
            continue
        if step == b"MAIL FROM:<>":
            possible = {is_open}
            for command in waiting:
                possible = {state if out is None else out
                            for state in possible for out in TRANSACTION_MODEL[command]}
            if True in possible:
                with pytest.raises(ProtocolError, match="MAIL while"):
                    machine.receive_client(step + b"\r\n")
                return
        machine.receive_client(step + b"\r\n")
        waiting.append(step)


# --- DATA -------------------------------------------------------------------------

ENVELOPE = [(C, b"MAIL FROM:<a@us.example>\r\nRCPT TO:<x@us.example>\r\nDATA\r\n"),
            (S, b"250 ok\r\n250 ok\r\n354 go ahead\r\n")]
ENVELOPE_EVENTS = [MailFrom("a@us.example"), RcptTo("x@us.example"), DataStarted()]


def test_data_refused_leaves_command_mode():
    steps = HELLO + [
        (C, b"MAIL FROM:<a@us.example>\r\nDATA\r\n"),
        (S, b"250 ok\r\n554 5.5.1 no valid recipients\r\n"),
        (C, b"RCPT TO:<victim@evil.example>\r\n"),
    ]
    check(steps, HELLO_EVENTS + [MailFrom("a@us.example"), RcptTo("victim@evil.example")])


def test_body_is_not_parsed():
    body = (b"RCPT TO:<victim@evil.example>\r\n"
            b"..\r\n"                       # dot-stuffed lone dot
            b"..RCPT TO:<v2@evil.example>\r\n"
            b".RCPT TO:<v3@evil.example>\r\n"
            b". \r\n"
            b"a line\r.\r\n"                # a bare CR does not end a line
            b"long " + b"x" * 3000 + b"\r\n"
            b"\r\n.\r\n")
    steps = HELLO + ENVELOPE + [(C, body)]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS + [MessageEnded()])


@pytest.mark.parametrize("end", [
    b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r\r\n",
])
def test_every_end_of_data_postfix_accepts(end):
    steps = HELLO + ENVELOPE + [
        (C, b"Subject: x\r\n\r\ntext" + end + b"RCPT TO:<victim@evil.example>\r\n"),
    ]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS + [MessageEnded(), RcptTo("victim@evil.example")],
          trailing=b"RCPT TO:<a@b")


def test_empty_message_ends_at_once():
    steps = HELLO + ENVELOPE + [(C, b".\r\nRSET\r\n"), (S, b"250 queued\r\n250 ok\r\n")]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS + [MessageEnded(), SessionReset("RSET"),
                                                   MessageQueued(None)])


@pytest.mark.parametrize("fake_end", [
    b"\r\n. \r\n", b"\r\n.x\r\n", b"\r\n..\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n,\r\n",
])
def test_near_misses_do_not_end_the_message(fake_end):
    steps = HELLO + ENVELOPE + [(C, b"text" + fake_end + b"RCPT TO:<victim@evil.example>\r\n")]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS)


def test_end_of_data_reply_is_matched():
    steps = HELLO + ENVELOPE + [
        (C, b"text\r\n.\r\nMAIL FROM:<b@us.example>\r\n"),
        (S, b"250 queued\r\n250 ok\r\n"),
        (C, b"DATA\r\n"), (S, b"354 go\r\n"),
    ]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS + [MessageEnded(), MailFrom("b@us.example"),
                                                   MessageQueued(None), DataStarted()])


def test_each_message_starts_at_a_line_start():
    steps = HELLO + ENVELOPE + [
        (C, b"x\r\n.\r\nMAIL FROM:<b@us.example>\r\nRCPT TO:<y@us.example>\r\nDATA\r\n"),
        (S, b"250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
        (C, b".\r\nQUIT\r\n"),
    ]
    check(steps, HELLO_EVENTS + ENVELOPE_EVENTS + [
        MessageEnded(), MailFrom("b@us.example"), RcptTo("y@us.example"), MessageQueued(None),
        DataStarted(), MessageEnded(), Quit()])


@pytest.mark.parametrize("early", [b"DATA\r\nSubject: x\r\n", b"DATA\r\nR", b"DATA\nRCPT TO:<a@b>\n"])
def test_bytes_after_data_before_its_reply(early):
    steps = HELLO + [(C, b"MAIL FROM:<a@us.example>\r\n" + early)]
    check(steps, HELLO_EVENTS + [MailFrom("a@us.example")], error=True)


def test_bytes_after_data_in_a_later_segment():
    steps = HELLO + [(C, b"MAIL FROM:<a@us.example>\r\nDATA\r\n"), (S, b"250 ok\r\n"), (C, b"x")]
    check(steps, HELLO_EVENTS + [MailFrom("a@us.example")], error=True)


def test_in_data_follows_the_message():
    machine = SMTPMachine()
    for side, data in HELLO + ENVELOPE:
        (machine.receive_client if side == C else machine.receive_server)(data)
    assert machine.in_data
    machine.receive_client(b"x\r\n.\r\n")
    assert not machine.in_data


# --- BDAT -------------------------------------------------------------------------

def test_bdat_chunks_are_skipped_by_count():
    chunk = b"RCPT TO:<victim@evil.example>\r\n.\r\n"
    steps = HELLO + [
        (C, b"MAIL FROM:<a@us.example>\r\nRCPT TO:<x@us.example>\r\n"),
        (C, b"BDAT %d\r\n" % len(chunk) + chunk[:10]),
        (C, chunk[10:] + b"BDAT 11 LAST\r\nRCPT TO"),
        (C, b":<\r\n\r\nRCPT TO:<y@us.example>\r\n"),
        (S, b"250 ok\r\n250 ok\r\n250 chunk\r\n250 queued\r\n250 ok\r\n"),
    ]
    check(steps, HELLO_EVENTS + [MailFrom("a@us.example"), RcptTo("x@us.example"),
                                 MessageEnded(), RcptTo("y@us.example"), MessageQueued(None)])


def test_bdat_zero_last():
    steps = HELLO + [(C, b"BDAT 0 LAST\r\nQUIT\r\n")]
    check(steps, HELLO_EVENTS + [MessageEnded(), Quit()])


def test_in_data_inside_a_chunk():
    machine = SMTPMachine()
    for side, data in HELLO:
        (machine.receive_client if side == C else machine.receive_server)(data)
    machine.receive_client(b"BDAT 4\r\nab")
    assert machine.in_data
    machine.receive_client(b"cd")
    assert not machine.in_data


@pytest.mark.parametrize("args", [b"", b"x", b"-1", b"+5", b"5 LAST x", b"5 FIRST",
                                  b"1" * 19, b"0x10"])
def test_bad_bdat_argument(args):
    check(HELLO + [(C, b"BDAT " + args + b"\r\n")], HELLO_EVENTS, error=True)


def test_bdat_without_chunking_offered():
    # A server without CHUNKING reads the chunk as commands: we cannot skip it.
    steps = [GREETING, EHLO, (S, b"250-mx\r\n250 PIPELINING\r\n"), (C, b"BDAT 4\r\nabcd")]
    check(steps, [SessionReset("EHLO")], error=True)


def test_chunking_is_read_from_the_latest_ehlo_reply():
    steps = HELLO + [EHLO, (S, b"250-mx\r\n250 PIPELINING\r\n"), (C, b"BDAT 4\r\nabcd")]
    check(steps, HELLO_EVENTS + [SessionReset("EHLO")], error=True)


# --- STARTTLS -------------------------------------------------------------------

def test_starttls_accepted_makes_the_streams_opaque():
    steps = HELLO + [(C, b"STARTTLS\r\n"), (S, b"220 2.0.0 Ready to start TLS\r\n\x16\x03")]
    check(steps, HELLO_EVENTS + [StartTLSRequested(), TLSStarted()])
    machine, _, _ = feed(steps)
    assert machine.settled and not machine.in_data
    assert machine.receive_client(b"\x16\x03\x01 RCPT TO:<a@b>\r\n" * 200) == []
    assert machine.receive_server(b"garbage\r\n") == []


def test_starttls_refused_keeps_parsing():
    steps = HELLO + [(C, b"STARTTLS\r\n"), (S, b"454 4.7.0 TLS not available\r\n"),
                     (C, b"MAIL FROM:<a@us.example>\r\n")]
    check(steps, HELLO_EVENTS + [StartTLSRequested(), MailFrom("a@us.example")])


@pytest.mark.parametrize("injected", [b"RCPT TO:<victim@evil.example>\r\n", b"R", b"\r\n"])
def test_starttls_command_injection(injected):
    # CVE-2011-0411: bytes pipelined behind STARTTLS
    check(HELLO + [(C, b"STARTTLS\r\n" + injected)], HELLO_EVENTS + [StartTLSRequested()],
          error=True)
    check(HELLO + [(C, b"STARTTLS\r\n"), (C, injected)],
          HELLO_EVENTS + [StartTLSRequested()], error=True)


@pytest.mark.parametrize(("reply", "keyword_at"), [
    (b"250-mx\r\n250-STARTTLS\r\n250 SIZE 10\r\n", 12),
    (b"250-mx\r\n250 STARTTLS\r\n", 12),
    (b"250-mx\r\n250-starttls\r\n250 OK\r\n", 12),
    (b"250-mx\n250-SIZE 1\n250-STARTTLS\n250 OK\n", 22),
    (b"250-mx\r\n250- STARTTLS \r\n250 OK\r\n", 13),
])
def test_tls_offered_offsets(reply, keyword_at):
    steps = [GREETING, EHLO, (S, reply)]
    offset = len(GREETING[1]) + keyword_at
    check(steps, [SessionReset("EHLO"), TLSOffered(offset, 8)])
    stream = GREETING[1] + reply
    assert stream[offset:offset + 8].upper() == b"STARTTLS"


@pytest.mark.parametrize(("command", "reply"), [
    (b"EHLO x", b"250 STARTTLS\r\n"),                  # the first line names the host
    (b"EHLO x", b"250-mx\r\n250-STARTTLSX\r\n250 OK\r\n"),
    (b"HELO x", b"250-mx\r\n250 STARTTLS\r\n"),
    (b"NOOP", b"250-mx\r\n250 STARTTLS\r\n"),
    (b"EHLO x", b"550-mx\r\n550 STARTTLS\r\n"),
])
def test_tls_not_offered(command, reply):
    steps = [GREETING, (C, command + b"\r\n"), (S, reply)]
    assert not any(isinstance(e, TLSOffered) for e in events_of(steps))


# --- AUTH -----------------------------------------------------------------------

def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_plain_initial_response():
    steps = HELLO + [(C, b"AUTH PLAIN " + b64(b"\0alice\0s3cret") + b"\r\nMAIL FROM:<a@us.example>\r\n"),
                     (S, b"235 2.7.0 Authentication successful\r\n250 ok\r\n")]
    check(steps, HELLO_EVENTS + [MailFrom("a@us.example"), LoginSucceeded("alice", "AUTH PLAIN")])


def test_auth_login_continuation():
    steps = HELLO + [
        (C, b"AUTH LOGIN\r\n"), (S, b"334 VXNlcm5hbWU6\r\n"),
        (C, b64(b"alice") + b"\r\n"), (S, b"334 UGFzc3dvcmQ6\r\n"),
        (C, b64(b"MAIL FROM:<x@y>") + b"\r\n"), (S, b"235 2.7.0 ok\r\n"),
        (C, b"MAIL FROM:<alice@us.example>\r\n"),
    ]
    check(steps, HELLO_EVENTS + [LoginSucceeded("alice", "AUTH LOGIN"), MailFrom("alice@us.example")])


def test_auth_response_lines_are_not_commands():
    steps = HELLO + [(C, b"AUTH PLAIN\r\n"), (S, b"334 \r\n"),
                     (C, b"RCPT TO:<victim@evil.example>\r\n"), (S, b"535 5.7.8 failed\r\n")]
    check(steps, HELLO_EVENTS + [LoginFailed(None, "AUTH PLAIN")])


def test_auth_cancelled():
    steps = HELLO + [(C, b"AUTH LOGIN\r\n"), (S, b"334 VXNlcm5hbWU6\r\n"),
                     (C, b"*\r\n"), (S, b"501 5.7.0 Authentication aborted\r\n"),
                     (C, b"QUIT\r\n")]
    check(steps, HELLO_EVENTS + [LoginFailed(None, "AUTH LOGIN"), Quit()])


def test_auth_ended_by_the_server_before_a_response():
    steps = HELLO + [(C, b"AUTH LOGIN\r\n"), (S, b"334 VXNlcm5hbWU6\r\n"),
                     (S, b"421 4.4.2 timeout\r\n"), (C, b"RCPT TO:<v@evil.example>\r\n")]
    check(steps, HELLO_EVENTS + [LoginFailed(None, "AUTH LOGIN"), RcptTo("v@evil.example")])


@pytest.mark.parametrize("command", [b"AUTH", b"AUTH PLAIN a b", b"AUTH \xff"])
def test_malformed_auth_is_not_challenged(command):
    # the MTA refuses these; a 334 to one means we no longer follow the MTA
    steps = HELLO + [(C, command + b"\r\n"), (S, b"334 x\r\n")]
    check(steps, HELLO_EVENTS, error=True)


def test_commands_pipelined_behind_a_challenged_auth():
    # The MTA reads the pipelined line as the SASL response; we read it as a command.
    steps = HELLO + [(C, b"AUTH LOGIN\r\nRCPT TO:<v@evil.example>\r\n"), (S, b"334 VXNlcm5hbWU6\r\n")]
    check(steps, HELLO_EVENTS + [RcptTo("v@evil.example")], error=True)


def test_credentials_never_leak():
    secret = b"hunter2-secret"
    machine = SMTPMachine(max_line=64)
    for side, data in HELLO:
        (machine.receive_client if side == C else machine.receive_server)(data)
    events = machine.receive_client(b"AUTH PLAIN " + b64(b"\0alice\0" + secret) + b"\r\n")
    events += machine.receive_server(b"535 5.7.8 failed\r\n")
    machine.receive_client(b"AUTH LOGIN\r\n")
    machine.receive_server(b"334 VXNlcm5hbWU6\r\n")
    machine.receive_client(b64(b"alice") + b"\r\n")
    machine.receive_server(b"334 UGFzc3dvcmQ6\r\n")
    with pytest.raises(ProtocolError) as caught:
        machine.receive_client(b64(secret * 8) + b"\r\n")
    with pytest.raises(ProtocolError) as again:
        machine.receive_client(b"x")
    for text in (repr(events), repr(machine), caught.value.hint, str(caught.value), again.value.hint):
        assert secret.decode() not in text and b64(secret).decode() not in text


# --- transaction tracking, lines, resets ------------------------------------

@pytest.mark.parametrize("steps", [
    [(C, b"MAIL FROM:<a@us.example>\r\n"), (S, b"250 ok\r\n"), (C, b"MAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nMAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nRSET x\r\nMAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nEHLO x\r\nMAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nDATA\r\n"), (S, b"250 ok\r\n554 no\r\n"),
     (C, b"MAIL FROM:<b@us.example>\r\n")],
])
def test_nested_mail_is_refused(steps):
    tagged, raised = completing_bytes(HELLO + steps)
    assert raised is not None and MailFrom("b@us.example") not in [e for e, *_ in tagged]
    check(HELLO + steps, [e for e, *_ in tagged], error=True)


@pytest.mark.parametrize("steps", [
    [(C, b"MAIL FROM:<a@us.example>\r\nRSET\r\nMAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\n"), (S, b"550 no\r\n"), (C, b"MAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nRSET x\r\n"), (S, b"250 ok\r\n250 ok\r\n"),
     (C, b"MAIL FROM:<b@us.example>\r\n")],
    [(C, b"MAIL FROM:<a@us.example>\r\nDATA\r\n"), (S, b"250 ok\r\n354 go\r\n"),
     (C, b".\r\nMAIL FROM:<b@us.example>\r\n")],
])
def test_mail_after_the_transaction_closed(steps):
    events = events_of(HELLO + steps)
    assert events[-1] == MailFrom("b@us.example")
    check(HELLO + steps, events)


@pytest.mark.parametrize("command", [b"RSET", b"EHLO other", b"HELO other", b"rset"])
def test_session_reset(command):
    name = command.split()[0].upper().decode()
    check([GREETING, (C, command + b"\r\n")], [SessionReset(name)])


def test_long_command_line():
    check([GREETING, (C, b"RCPT TO:<" + b"a" * 3000)], [], error=True)
    check([GREETING, (C, b"NOOP " + b"a" * 2042 + b"\r\n")], [])   # 2047 octets and CRLF fit


def test_long_server_line():
    check([(S, b"220 " + b"x" * 3000)], [], error=True)


@pytest.mark.parametrize("line", [b"STARTTLS\0", b"DATA\0x", b"NOOP\0RCPT TO:<a@b>"])
def test_nul_in_a_command_line(line):
    # Postfix reads a command up to the NUL: `STARTTLS\0` is STARTTLS to it
    check([GREETING, (C, line + b"\r\n")], [], error=True)


def test_empty_and_whitespace_lines_take_a_reply_slot():
    steps = [GREETING, (C, b"\r\n \t\r\nDATA\r\n"), (S, b"500 what\r\n500 what\r\n354 go\r\n")]
    check(steps, [DataStarted()])


# --- Hypothesis -------------------------------------------------------------------

FRAGMENTS = [
    b"220 hi\r\n", b"250 ok\r\n", b"250-mx\r\n", b"250-STARTTLS\r\n", b"250 CHUNKING\r\n",
    b"354 go\r\n", b"334 x\r\n", b"235 ok\r\n", b"535 no\r\n", b"554 no\r\n", b"221 bye\r\n",
    b"EHLO x\r\n", b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n",
    b"BDAT 3\r\n", b"BDAT 2 LAST\r\n", b"AUTH LOGIN\r\n", b"AUTH PLAIN AGFAYg==\r\n",
    b"STARTTLS\r\n", b"RSET\r\n", b"QUIT\r\n", b"\r\n.\r\n", b".\n", b"\n", b"\r", b".",
]
chunks = st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), chunks), max_size=40))
def test_any_bytes_parse_or_raise_protocol_error(steps):
    machine = SMTPMachine(max_line=64, max_pending_bytes=8 * 64)
    failed = False
    for to_server, data in steps:
        receive = machine.receive_server if to_server else machine.receive_client
        try:
            events = receive(data)
        except ProtocolError:
            failed = True
            continue
        assert not failed, "a failed machine must keep failing"
        assert isinstance(events, list)


# A valid session, generated together with the events it must produce.

atoms = st.text("abcdefghijklmnopqrstuvwxyz0123456789+_-", min_size=1, max_size=8)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=3).map(".".join)
locals_ = st.one_of(
    st.lists(atoms, min_size=1, max_size=3).map(".".join),
    st.text("abc xyz<>:,;", min_size=1, max_size=8).map(lambda s: f'"{s}"'),
)


def read_as(local: str) -> str:
    """The local part as the grammar reads it: quotes it does not need are dropped."""
    return local[1:-1] if re.fullmatch(r'"[a-z]+"', local) else local


# (address as sent, address as read)
addresses = st.builds(lambda local, domain: (f"{local}@{domain}", f"{read_as(local)}@{domain}"),
                      locals_, domains)


@st.composite
def paths(draw):
    address, read = draw(addresses)
    route = draw(st.sampled_from(["", "@relay.example:", "@a.example,@b.example:"]))
    bracket = draw(st.booleans()) or route or '"' in address
    text = f"<{route}{address}>" if bracket else address
    space = draw(st.sampled_from(["", " "]))
    params = draw(st.sampled_from(["", " SIZE=100", " BODY=8BITMIME", " NOTIFY=NEVER"]))
    return space + text + params, read, params.strip()


body_lines = st.lists(st.one_of(
    st.text("abc .:<>@", max_size=20), st.just("."), st.just(".."), st.just("RCPT TO:<v@evil.example>"),
), max_size=6)


@st.composite
def sessions(draw):
    """(client/server steps, expected events) of a valid PIPELINING session."""
    steps, events = list(HELLO), list(HELLO_EVENTS)
    for _ in range(draw(st.integers(1, 3))):
        path, sender, params = draw(paths())
        client, replies = [b"MAIL FROM:%s\r\n" % path.encode()], [b"250 2.1.0 Ok\r\n"]
        events.append(MailFrom(sender, params))
        for _ in range(draw(st.integers(1, 4))):
            path, recipient, params = draw(paths())
            client.append(b"RCPT TO:%s\r\n" % path.encode())
            replies.append(draw(st.sampled_from([b"250 2.1.5 Ok\r\n", b"550 5.1.1 no\r\n"])))
            events.append(RcptTo(recipient, params))
        if draw(st.booleans()):
            steps += [(C, b"".join(client) + b"DATA\r\n"), (S, b"".join(replies) + b"354 go\r\n")]
            eol = draw(st.sampled_from([b"\r\n", b"\n"]))
            lines = [(b"." + line if line.startswith(b".") else line)
                     for line in (s.encode() for s in draw(body_lines))]
            steps += [(C, b"".join(line + eol for line in lines) + b"." + eol),
                      (S, b"250 2.0.0 queued\r\n")]
            events += [DataStarted(), MessageEnded(), MessageQueued(None)]
        else:
            body = draw(st.binary(max_size=30))
            client.append(b"BDAT %d LAST\r\n" % len(body) + body)
            steps += [(C, b"".join(client)), (S, b"".join(replies) + b"250 2.0.0 queued\r\n")]
            events += [MessageEnded(), MessageQueued(None)]
    steps.append((C, b"QUIT\r\n"))
    events.append(Quit())
    return steps, events


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions(), st.data())
def test_valid_session_is_the_same_however_cut(session, data):
    steps, expected = session
    _, whole, error = feed(steps)
    assert error is None and [e for e, *_ in whole] == expected
    pieces = []
    for side, chunk in steps:
        cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(chunk) - 1)), max_size=4))))
        bounds = [0, *[c for c in cuts if c < len(chunk)], len(chunk)]
        pieces += [(side, chunk[a:b]) for a, b in zip(bounds, bounds[1:])]
    _, cut, error = feed(pieces)
    assert error is None and [e for e, *_ in cut] == expected


def test_streams_helper_covers_every_cut():
    data = b"RCPT TO:<a@b>\r\n"
    variants = list(splits(data))
    assert all(b"".join(v) == data for v in variants)
    assert [data] in variants and [data[i:i + 1] for i in range(len(data))] in variants
    assert all([data[:k], data[k:]] in variants for k in range(1, len(data)))


def test_a_line_of_exactly_max_line_with_crlf_split_before_the_lf():
    machine = SMTPMachine(max_line=20)
    machine.receive_server(b"220 mx\r\n")
    line = b"NOOP " + b"x" * 15
    assert len(line) == 20
    machine.receive_client(line + b"\r")
    machine.receive_client(b"\n")
    with pytest.raises(ProtocolError):
        machine.receive_client(b"NOOP " + b"x" * 16 + b"\r\n")


@pytest.mark.parametrize(("text", "queue_id"), [
    (b"2.0.0 Ok: queued as 4XkQ2B1c2Dz9", "4XkQ2B1c2Dz9"),                        # Postfix
    (b"Ok: queued as 3F1A2B4C5D", "3F1A2B4C5D"),                                  # Postfix, no ESC
    (b"2.0.0 5B6Gq1Zk012345 Message accepted for delivery", "5B6Gq1Zk012345"),    # Sendmail
    (b"5B6Gq1Zk012345 Message accepted for delivery", "5B6Gq1Zk012345"),
    (b"OK id=1tRbXg-000Ab1-2c", "1tRbXg-000Ab1-2c"),                              # Exim 4.9x
    (b"OK id=1tRbXg-000000000Ab1-0002", "1tRbXg-000000000Ab1-0002"),              # Exim 4.97+
    (b"2.0.0 queued", None), (b"ok", None), (b"Ok: queued as \x1b[31mX", None),
    (b"Ok: queued as " + b"A" * 200, None),
])
def test_the_queue_id_in_a_reply_that_took_a_message(text, queue_id):
    assert grammar.queue_id(text) == queue_id
