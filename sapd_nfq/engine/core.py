"""The engine: packet bytes in, a Decision out. No sockets, no netlink.

Per packet, in steps that each return a value or the Decision itself:
parse the headers; route the packet (its protocol, its direction); track
its flow (open it at the client's SYN, or settle a packet whose connection
was refused, let go, or never seen); inspect it (judge it in its TCP stream,
feed the new bytes to the session's machine, judge the machine's events);
and rewrite what passes. The Decision is built once, at the end of the step
that decides. Everything that can grant relay is decided here, from the
relay table in policy.py; the NFQUEUE loop only carries out the Decision.

Safe verdicts, in one place:
- a packet we cannot parse: DROP;
- a packet the queue copied only part of (longer than its copy range, or
  over 64 KB): never inspected, rewritten or counted as seen; SMTP drops it
  (a loss the sender repairs), a POP3 or IMAP flow leaves the queue;
- an SMTP packet of a connection we did not see open (sapd-nfq restarted, or
  the flow was evicted): DROP and reset both ends, since we cannot know
  whether it carries an uninspected RCPT; the client reconnects and is
  inspected from the start. A receiver ahead of the packet's seq ignores
  that RST, so it also gets an ACK probe: its duplicate ACK, untracked in
  turn, draws a RST at its own ack. A SYN-ACK is only dropped: carrying
  nothing, it is not worth the crafted packets that a SYN flood evicting
  half-open flows would make us send for each one;
- an SMTP stream that breaks the protocol or rewrites inspected bytes: the
  session is refused like a relay attempt;
- POP3 and IMAP trouble never opens a relay (it can only lose a login), so
  such flows we cannot follow leave the queue instead;
- a packet whose ports say one direction while the binding says it came in
  from the other side (a client forging the server's replies on its own
  link): DROP, counted as `wrong_direction`. Where the binding tells where a
  packet came in, that decides its direction, never its ports.

Every decision that does more than pass the packet as it came names its
reason (`Decision.reason`). Monitor mode (`enforce = false`) is not decided
here: the worker passes every packet unchanged (verdicts.carried). The
engine only keeps its view of the streams true to the wire: in monitor mode
a refused recipient is not rewritten, so it is judged and logged, and the
session followed on, as the MTA sees it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from . import craft
from .counters import (
    ACK_REQUESTS,
    CONFLICTS,
    FAIL,
    FLOWS,
    FOREIGN,
    HELD_BACK,
    LOGINS,
    MALFORMED,
    PACKETS,
    PASS,
    PROTOCOL_ERRORS,
    STORE_ERRORS,
    TLS_REFUSED,
    TRUNCATED,
    UNTRACKED,
    URGENT_CLEARED,
    WRONG_DIRECTION,
)
from .errors import MalformedPacket, ProtocolError
from .events import (
    Answered,
    Event,
    LoginFailed,
    LoginSucceeded,
    MailFrom,
    MessageQueued,
    RcptTo,
    SessionReset,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from .flows import Flow, FlowTable, State, payload_offset
from .logins import LoginStore, StoreError
from .packet import ACK, RST, SYN, URG, Segment, Truncated, parse, with_stream_bytes, without_urgent
from .policy import Fail, RelayPolicy
from .refusal import FORMS, MTA, Form, Refusals
from .session import Fate, Session
from .stream import Outcome
from .verdicts import ACCEPT, ACCEPTED, BYPASS, BYPASSED, DROP, Decision, Notice, Verdict

SMTP_RELAY_DENIED = b"550 5.7.1 Relaying denied: log in by POP3 first\r\n"
SMTP_REFUSED = b"554 5.7.1 Session refused by the relay gate\r\n"
SMTP_NO_TLS = b"454 4.7.0 TLS not available\r\n"
POP3_NO_TLS = b"-ERR TLS not available\r\n"
POP3_REFUSED = b"-ERR Session refused by the relay gate\r\n"
IMAP_NO_TLS = b"* BYE TLS not available\r\n"
IMAP_REFUSED = b"* BYE Session refused by the relay gate\r\n"
_NO_TLS = {"smtp": SMTP_NO_TLS, "pop3": POP3_NO_TLS, "imap": IMAP_NO_TLS}
_REFUSED = {"smtp": SMTP_REFUSED, "pop3": POP3_REFUSED, "imap": IMAP_REFUSED}

_MASK = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class _Refusal:
    """Why a session is refused, and what its client reads."""

    #: the reason noticed (as `event`); None where an earlier notice says it
    hint: str | None
    #: the refusal's name in the decision and the metrics (Decision.reason)
    cause: str
    #: the reply to the client; None: the protocol's "session refused"
    reply: bytes | None = None
    event: str = "reset"


@dataclass(frozen=True, slots=True)
class _Reading:
    """What the new bytes of one stream made of its session."""

    notices: tuple[Notice, ...] = ()
    #: the session is refused: the packet is dropped, both ends reset
    refusal: _Refusal | None = None
    #: nothing more to learn: the rest of the flow leaves the queue
    settled: bool = False


def _notice(flow: Flow[Session], event: str, now: float, **fields: str | None) -> Notice:
    """A notice about `flow`: both ends' addresses and ports, so that the line
    matches the MTA's own for the same session."""
    client, client_port, server, server_port = flow.key
    return Notice(event, client, server, client_port=client_port, server_port=server_port,
                  time=now, **fields)


_TRUNCATED = Decision(DROP, reason="truncated")
_MALFORMED = Decision(DROP, reason="malformed")
_WRONG_DIRECTION = Decision(DROP, reason="wrong_direction")
_HELD_BACK = Decision(DROP, reason="held_back")
_REFUSED_SESSION = Decision(DROP, reason="refused_session")
_UNTRACKED = Decision(DROP, reason="untracked_connection")

_NOTHING_NEW = _Reading()
_SETTLED = _Reading(settled=True)


class Settings(Protocol):
    """The configuration keys the engine reads (sapd_nfq.wiring.config.Config has
    them all; tests may pass anything that has these)."""

    @property
    def smtp_ports(self) -> Sequence[int]: ...
    @property
    def pop3_ports(self) -> Sequence[int]: ...
    @property
    def max_flows(self) -> int: ...
    @property
    def auth_ttl(self) -> int: ...
    @property
    def smtp_auth_relays(self) -> bool: ...
    @property
    def smtp_starttls(self) -> str: ...
    @property
    def pop3_stls(self) -> str: ...
    @property
    def refusal(self) -> str: ...
    @property
    def mta(self) -> str: ...
    @property
    def imap_ports(self) -> Sequence[int]: ...
    @property
    def imap_starttls(self) -> str: ...
    @property
    def enforce(self) -> bool: ...


class Engine:
    def __init__(self, config: Settings, policy: RelayPolicy, logins: LoginStore) -> None:
        self.config = config
        self.policy = policy
        self.logins = logins
        self.flows: FlowTable[Session] = FlowTable(max_flows=config.max_flows)
        self.counters: Counter[str] = Counter()
        self._set_ports(config)
        self._next_expiry = 0.0

    def reconfigure(self, config: Settings, policy: RelayPolicy) -> None:
        """Take a new config and table; tracked flows and logins stay."""
        self.config = config
        self.policy = policy
        self._set_ports(config)
        self.flows.max_flows = config.max_flows

    def _set_ports(self, config: Settings) -> None:
        self._smtp_ports = frozenset(config.smtp_ports)
        self._protocols = {**{p: "imap" for p in config.imap_ports},
                           **{p: "pop3" for p in config.pop3_ports},
                           **{p: "smtp" for p in config.smtp_ports}}
        self._mail_ports = frozenset(self._protocols)


    # -- the per-packet path ------------------------------------------------

    def handle(self, packet: bytes, now: float, wire_len: int | None = None,
               from_client_side: bool | None = None) -> Decision:
        """The Decision for one queued packet.

        `from_client_side` is where the packet came in, as the binding tells:
        True from a client interface, False from the server side (or sent by
        this host), None when unknown (a replay): then the ports decide.
        """
        counters = self.counters
        counters[PACKETS] += 1
        if now >= self._next_expiry:
            self.flows.expire(now)
            self._next_expiry = now + 1.0
        whole = True
        try:
            seg = parse(packet, wire_len)
        except Truncated as exc:
            counters[TRUNCATED] += 1
            if exc.segment is None:
                return _TRUNCATED
            seg, whole = exc.segment, False
        except MalformedPacket:
            counters[MALFORMED] += 1
            return _MALFORMED
        route = self._route(seg, from_client_side)
        if isinstance(route, Decision):
            return route
        protocol, from_client = route
        if not whole:
            return self._truncated(seg, protocol, from_client, now)
        cleared = None
        if seg.flags & URG:  # the receiver must read the urgent byte in line, as we do
            counters[URGENT_CLEARED] += 1
            packet = cleared = without_urgent(packet, seg)
            seg = parse(packet)
        flow = self._track(seg, protocol, from_client, now)
        if isinstance(flow, Decision):
            return flow
        return self._inspect(flow, seg, packet, cleared, from_client, now)

    def _route(self, seg: Segment, from_client_side: bool | None) -> tuple[str, bool] | Decision:
        """The segment's protocol and whether it comes from the client; or the
        Decision for a segment that is not ours to judge."""
        if from_client_side is None:  # by ports, SMTP's first: a client picks its own port
            if seg.dport in self._smtp_ports:
                from_client = True
            elif seg.sport in self._smtp_ports:
                from_client = False
            elif seg.dport in self._mail_ports:
                from_client = True
            elif seg.sport in self._mail_ports:
                from_client = False
            else:
                self.counters[FOREIGN] += 1
                return ACCEPTED
        else:
            from_client = from_client_side
        protocol = self._protocols.get(seg.dport if from_client else seg.sport)
        if protocol is None:
            if (seg.sport if from_client else seg.dport) in self._mail_ports:
                # e.g. "from the server" by its ports, but it came in on a client interface
                self.counters[WRONG_DIRECTION] += 1
                return _WRONG_DIRECTION
            self.counters[FOREIGN] += 1
            return ACCEPTED
        return protocol, from_client

    def _track(self, seg: Segment, protocol: str, from_client: bool,
               now: float) -> Flow[Session] | Decision:
        """The segment's flow, opened at the client's SYN; or the Decision for
        a segment of a connection we did not see open, refused or let go."""
        if from_client:
            key = (seg.src, seg.sport, seg.dst, seg.dport)
        else:
            key = (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        opening = from_client and seg.flags & (SYN | ACK | RST) == SYN
        if flow is None or (opening and (flow.state is State.CLOSED
                                         or flow.app.fate is not Fate.INSPECTED)):
            # A client may reuse its port once the old connection is closed,
            # refused or let go: the new one is inspected from its start.
            if not opening:
                return self._untracked(seg, protocol == "smtp")
            flow = self.flows.open(key, seg, now, Session(protocol))
            self.counters[FLOWS] += 1
        fate = flow.app.fate
        if fate is Fate.REFUSED:
            self.flows.touch(flow, now)
            return self._refused_flow(seg, from_client)
        if fate is Fate.BYPASSED:
            return BYPASSED
        return flow

    def _inspect(self, flow: Flow[Session], seg: Segment, packet: bytes, cleared: bytes | None,
                 from_client: bool, now: float) -> Decision:
        """Judge the segment in its stream, read the bytes it adds, and say
        what passes: `packet`, or its rewrite (`cleared`: its urgent
        pointer cleared; TLS offers hidden; refused recipients laid over)."""
        outcome, data = flow.handle(seg, from_client)
        self.flows.touch(flow, now)  # after handle(): the state picks the timeout
        if outcome is Outcome.CONFLICT:
            self.counters[CONFLICTS] += 1
            return self._refuse(flow, seg, from_client, now,
                                _Refusal("retransmission differs from the inspected bytes",
                                         "retransmission_differs"))
        session = flow.app
        if outcome is Outcome.GAP or outcome is Outcome.OVERFLOW:
            self.counters[HELD_BACK] += 1
            if outcome is Outcome.OVERFLOW:  # only an ACK frees the kept bytes: ask for one
                return Decision(DROP, inject=self._ask_for_ack(flow, session, 0, seg, from_client,
                                                               full=True), reason=_HELD_BACK.reason)
            return _HELD_BACK
        reading = self._read(flow, session, data, from_client, now) if data else _NOTHING_NEW
        if reading.refusal is not None:
            return self._refuse(flow, seg, from_client, now, reading.refusal, reading.notices)
        asking = self._ask_for_ack(flow, session, len(data), seg, from_client) if data else ()
        passed = cleared
        if seg.payload and (session.hidden or session.refusals is not None):
            passed = self._rewrite(flow, session, seg, packet, from_client) or cleared
        verdict: Verdict = ACCEPT
        if reading.settled:
            verdict = BYPASS
            session.fate = Fate.BYPASSED
            flow.release()  # what follows is no longer compared
        if passed is None and not reading.notices and not asking:
            return ACCEPTED if verdict is ACCEPT else BYPASSED
        return Decision(verdict, passed, inject=asking, notices=reading.notices,
                        reason=self._reason(session, reading, passed, cleared))

    def _ask_for_ack(self, flow: Flow[Session], session: Session, new: int, seg: Segment,
                     from_client: bool, full: bool = False) -> tuple[bytes, ...]:
        """A byte the receiver had before, sent to it again, when the bytes kept
        for comparison near their limit, or are `full` (the segment was dropped
        for it; each resend asks again, in case an answer was lost): its answer
        is an ACK the queue sees (stream.py, `wants_ack`). Never a byte the gate
        rewrote: the receiver got the rewritten one. `new` bytes of the segment
        were just taken into the stream."""
        stream = flow.client if from_client else flow.server
        if stream is None or not (full or stream.wants_ack()):
            return ()
        before = stream.byte_before(new)
        if before is None:
            return ()
        at = stream.offset_of(before[0])
        refused = () if session.refusals is None else \
            session.refusals.client if from_client else session.refusals.server
        spans = [(offset, len(text)) for offset, text in refused]
        if not from_client:
            spans += session.hidden
        if any(offset <= at < offset + length for offset, length in spans):
            return ()
        self.counters[ACK_REQUESTS] += 1
        return (craft.duplicate_to_receiver(seg, *before),)

    @staticmethod
    def _reason(session: Session, reading: _Reading, passed: bytes | None,
                cleared: bytes | None) -> str | None:
        """What a decision that passes the packet refuses or rewrites, if anything."""
        if any(notice.event == "fail" for notice in reading.notices):
            return "relay_denied"  # refused in place
        if passed is None:
            return None
        if passed is cleared:
            return "urgent_cleared"
        return "relay_denied" if session.refusals is not None else "starttls_hidden"

    # -- protocol events ----------------------------------------------------

    def _read(self, flow: Flow[Session], session: Session, data: bytes, from_client: bool,
              now: float) -> _Reading:
        """Feed new stream bytes to the session's machine and judge its events."""
        machine = session.machine
        if session.mta is not None and not from_client:
            session.mta.feed(data)
        try:
            events = machine.receive_client(data) if from_client else machine.receive_server(data)
        except ProtocolError as exc:
            self.counters[PROTOCOL_ERRORS] += 1
            if session.smtp is not None:
                return _Reading(refusal=_Refusal(exc.hint, "protocol_error"))
            return _Reading((_notice(flow, "error", now,
                                     reason=f"{session.protocol.upper()}: {exc.hint}; "
                                            "not followed further"),), settled=True)
        if not events and session.refusals is None:
            return _SETTLED if machine.settled else _NOTHING_NEW
        return self._judge(flow, session, events, data, from_client, now)

    def _judge(self, flow: Flow[Session], session: Session, events: list[Event], data: bytes,
               from_client: bool, now: float) -> _Reading:
        client = flow.key[0]
        notices: list[Notice] = []
        for event in events:
            if isinstance(event, RcptTo):
                ruling = self.policy.decide(
                    client, session.sender or "", event.recipient, now,
                    authenticated=session.authenticated and self.config.smtp_auth_relays,
                )
                failed = isinstance(ruling, Fail)
                self.counters[FAIL if failed else PASS] += 1
                notices.append(_notice(
                    flow, "fail" if failed else "pass", now, user=ruling.user or session.user,
                    sender=session.sender or "", recipient=event.recipient,
                    row=ruling.row, reason=ruling.reason))
                if failed and not self._refuse_in_place(session, flow, event, data):
                    return _Reading(tuple(notices), _Refusal(None, "relay_denied", SMTP_RELAY_DENIED))
            elif isinstance(event, MailFrom):
                session.sender = event.sender
            elif isinstance(event, SessionReset):
                session.sender = None
            elif isinstance(event, MessageQueued):
                notices.append(_notice(flow, "queued", now, user=session.user,
                                       sender=session.sender or "", queue_id=event.queue_id))
            elif isinstance(event, LoginSucceeded):
                notices.append(self._login(session, flow, event, now))
            elif isinstance(event, LoginFailed):
                notices.append(_notice(flow, "login-failed", now, user=event.user,
                                       reason=event.method))
            elif isinstance(event, TLSOffered):
                if not self._tls_allowed(session, client, now):
                    session.hidden += ((event.offset, event.length),)
            elif isinstance(event, StartTLSRequested):
                if not self._tls_allowed(session, client, now):
                    self.counters[TLS_REFUSED] += 1
                    return _Reading(tuple(notices), _Refusal(
                        "STARTTLS not allowed by policy", "starttls_not_allowed",
                        _NO_TLS[session.protocol], "tls"))
            elif isinstance(event, TLSStarted):
                notices.append(_notice(flow, "tls", now,
                                       reason="TLS started; session no longer inspected"))
        smtp = session.smtp
        if session.refusals is not None and smtp is not None and not from_client \
                and flow.server is not None:
            answered = [event for event in events if isinstance(event, Answered)]
            if not session.refusals.replies(data, flow.server.offset - len(data), answered,
                                            smtp.reply_under_way):
                return _Reading(tuple(notices), _Refusal(
                    "the MTA accepted the command a refused RCPT became", "refusal_accepted"))
        return _Reading(tuple(notices), settled=session.machine.settled)

    def _login(self, session: Session, flow: Flow[Session], event: LoginSucceeded,
               now: float) -> Notice:
        if session.smtp is not None:
            session.authenticated = True
            session.user = event.user
            source = "smtp-auth"
        else:
            source = session.protocol
            try:
                self.logins.add(flow.key[0], event.user, now, self.config.auth_ttl, source=source)
            except StoreError as exc:  # the session goes on; only the login is lost
                self.counters[STORE_ERRORS] += 1
                return _notice(flow, "error", now, user=event.user,
                               reason=f"login not recorded: {exc}")
        self.counters[LOGINS] += 1
        return _notice(flow, "login", now, user=event.user, reason=f"{source} {event.method}")

    def _tls_allowed(self, session: Session, client: str, now: float) -> bool:
        if session.smtp is not None:
            return (self.config.smtp_starttls == "relay-clients"
                    and self.policy.may_relay(client, now))
        policy = self.config.pop3_stls if session.protocol == "pop3" else self.config.imap_starttls
        return policy == "allow"

    # -- refusing -----------------------------------------------------------

    def _refuse(self, flow: Flow[Session], seg: Segment, from_client: bool, now: float,
                refusal: _Refusal, notices: Sequence[Notice] = ()) -> Decision:
        """Drop `seg`, tell the client why, and reset both ends.

        The reply goes to the client with FIN, so it reads a definite answer
        before the connection ends; the server is reset at the seq of the
        dropped segment, so the offending bytes never reach it (and after
        the bytes we passed, where that differs).
        """
        session = flow.app
        session.fate = Fate.REFUSED
        flow.release()
        # Both ends are reset: the flow is kept only to reset stragglers, as
        # long as a closed one (a flood of refusals would otherwise hold its
        # flows for the idle timeout).
        flow.state = State.CLOSED
        self.flows.touch(flow, now)
        reply = _REFUSED[session.protocol] if refusal.reply is None else refusal.reply
        if from_client:
            inject = [craft.reply_and_close(seg, reply), craft.reset_receiver(seg)]
            # The server expects the seq after the bytes we passed (a resend that
            # overlaps them starts before it), or this segment's if those were lost
            # after us; only the exact one resets it (RFC 5961), so send both.
            passed = None if flow.client is None else (flow.client.next_seq - flow.client.added) & _MASK
            if passed is not None and passed != seg.seq:
                inject.append(craft.reset_receiver(seg, passed))
        else:
            inject = [craft.reset_receiver(seg), craft.reset_sender(seg)]
        if refusal.hint is not None:
            notices = (*notices, _notice(flow, refusal.event, now, reason=refusal.hint))
        return Decision(DROP, inject=tuple(inject), notices=tuple(notices), reason=refusal.cause)

    @staticmethod
    def _refused_flow(seg: Segment, from_client: bool) -> Decision:
        """A refused session's stragglers: drop, and reset the client again."""
        if from_client and not seg.flags & RST:
            return Decision(DROP, inject=(craft.reset_sender(seg),), reason=_REFUSED_SESSION.reason)
        return _REFUSED_SESSION

    def _truncated(self, seg: Segment, protocol: str, from_client: bool, now: float) -> Decision:
        """A packet we hold only part of: never inspected, rewritten or taken as seen.

        SMTP drops it, as if it had been lost before us: the sender sends it
        again, and its bytes are inspected when they arrive whole. A POP3 or
        IMAP flow leaves the queue: losing it can only lose a login.
        """
        key = (seg.src, seg.sport, seg.dst, seg.dport) if from_client else \
            (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        fate = None if flow is None else flow.app.fate
        if fate is Fate.REFUSED:
            return self._refused_flow(seg, from_client)
        if fate is Fate.BYPASSED:
            return BYPASSED
        if protocol == "smtp":
            return _TRUNCATED
        if flow is None:
            return BYPASSED
        flow.app.fate = Fate.BYPASSED
        flow.release()
        return Decision(BYPASS, notices=(Notice(
            "error", key[0], key[2], client_port=key[1], server_port=key[3], time=now,
            reason=f"{protocol.upper()}: a packet longer than the queue copies; not followed further"),))

    def _untracked(self, seg: Segment, smtp: bool) -> Decision:
        self.counters[UNTRACKED] += 1
        if not smtp:
            return BYPASSED
        if seg.flags & (RST | SYN):
            return _UNTRACKED
        inject = [craft.reset_sender(seg)]
        if seg.flags & ACK:
            # Its answer, if the receiver is ahead of seg (say, a client
            # retransmitting data whose ACKs died with the old daemon), is
            # untracked too and brings it a RST that lands.
            inject.append(craft.probe_receiver(seg))
        inject.append(craft.reset_receiver(seg))
        return Decision(DROP, inject=tuple(inject), reason=_UNTRACKED.reason)

    # -- refusing one recipient in place (refusal.py) --------------------------

    def _refuse_in_place(self, session: Session, flow: Flow[Session], event: RcptTo,
                         data: bytes) -> bool:
        """Refuse only this recipient, if the whole command line is in the
        new bytes: what went on to the MTA before cannot be rewritten.

        In monitor mode nothing is rewritten: the MTA reads the RCPT as sent
        and the session goes on, so there is no rewrite to keep and no reply
        to watch."""
        if self.config.refusal != "recipient" or flow.client is None or session.smtp is None:
            return False
        if event.offset < flow.client.offset - len(data):
            return False
        if not self.config.enforce:
            return True
        if session.refusals is None:
            session.refusals = Refusals()
        session.refusals.refuse(event, self._form(session))
        session.smtp.watch(event.number)
        return True

    def _form(self, session: Session) -> Form:
        """The refusal that costs this session's MTA nothing (refusal.py)."""
        if self.config.mta != "auto":
            return FORMS[MTA(self.config.mta)]
        assert session.mta is not None  # only SMTP has recipients
        return FORMS[session.mta.mta or MTA.OTHER]

    # -- rewriting what passes ----------------------------------------------

    @staticmethod
    def _rewrite(flow: Flow[Session], session: Session, seg: Segment, packet: bytes,
                 from_client: bool) -> bytes | None:
        """`packet` with hidden TLS offers overwritten with X and the refused
        recipients' rewrites laid over it (retransmissions too); None if
        nothing in it changes."""
        changed = None
        server = flow.server
        if session.hidden and not from_client and server is not None:
            changed = with_stream_bytes(packet, seg, payload_offset(server, seg),
                                        ((offset, b"X" * length) for offset, length in session.hidden))
        refusals = session.refusals
        stream = flow.client if from_client else server
        # A SYN's data (TCP Fast Open) comes before the server has a stream.
        if refusals is None or flow.client is None or stream is None:
            return changed
        refusals.forget(flow.client.offset - flow.client.retained,
                        0 if server is None else server.offset - server.retained)
        laid = with_stream_bytes(changed or packet, seg, payload_offset(stream, seg),
                                 refusals.client if from_client else refusals.server)
        return changed if laid is None else laid
