"""The engine: packet bytes in, a Decision out. No sockets, no netlink.

Per packet: parse the headers, find the flow, normalise the TCP stream, feed
the new bytes to the flow's protocol machine, and turn its events into a
verdict. Everything that can grant relay is decided here, from the relay
table in policy.py; the NFQUEUE loop only carries out the Decision.

Safe verdicts, in one place:
- a packet we cannot parse, or that the queue binding truncated: DROP;
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
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from . import craft
from .errors import MalformedPacket, ProtocolError
from .events import (
    Answered,
    LoginFailed,
    LoginSucceeded,
    MailFrom,
    RcptTo,
    SessionReset,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from .flows import Flow, FlowTable, State, payload_offset
from .imap import IMAPMachine
from .logins import LoginStore, StoreError
from .packet import ACK, RST, SYN, URG, Segment, Truncated, parse, with_stream_bytes, without_urgent
from .policy import Fail, RelayPolicy
from .pop3 import POP3Machine
from .refusal import Refusals
from .smtp import SMTPMachine
from .stream import Outcome, Stream
from .verdicts import ACCEPT, BYPASS, DROP, Decision, Notice

SMTP_RELAY_DENIED = b"550 5.7.1 Relaying denied: log in by POP3 first\r\n"
SMTP_REFUSED = b"554 5.7.1 Session refused by the relay gate\r\n"
SMTP_NO_TLS = b"454 4.7.0 TLS not available\r\n"
POP3_NO_TLS = b"-ERR TLS not available\r\n"
POP3_REFUSED = b"-ERR Session refused by the relay gate\r\n"
IMAP_NO_TLS = b"* BYE TLS not available\r\n"
IMAP_REFUSED = b"* BYE Session refused by the relay gate\r\n"
_MACHINES: dict[str, type[SMTPMachine | POP3Machine | IMAPMachine]] = {
    "smtp": SMTPMachine, "pop3": POP3Machine, "imap": IMAPMachine}
_NO_TLS = {"smtp": SMTP_NO_TLS, "pop3": POP3_NO_TLS, "imap": IMAP_NO_TLS}
_REFUSED = {"smtp": SMTP_REFUSED, "pop3": POP3_REFUSED, "imap": IMAP_REFUSED}

_MASK = 0xFFFFFFFF
FAILED = "failed"
BYPASSED = "bypassed"


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
    def imap_ports(self) -> Sequence[int]: ...
    @property
    def imap_starttls(self) -> str: ...


class Session:
    """What the engine knows of one connection beyond TCP."""

    __slots__ = ("protocol", "smtp", "machine", "sender", "authenticated", "user", "hidden", "refusals")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol  # "smtp", "pop3" or "imap": also the source of its logins
        self.smtp = protocol == "smtp"
        self.machine: SMTPMachine | POP3Machine | IMAPMachine = _MACHINES[protocol]()
        self.sender: str | None = None
        self.authenticated = False
        #: the SMTP AUTH login name, once the server accepted it
        self.user: str | None = None
        #: server-stream (offset, length) ranges overwritten to hide TLS
        self.hidden: list[tuple[int, int]] = []
        #: recipients refused in place (refusal.py), once there is one
        self.refusals: Refusals | None = None


class Engine:
    def __init__(self, config: Settings, policy: RelayPolicy, logins: LoginStore) -> None:
        self.config = config
        self.policy = policy
        self.logins = logins
        self.flows = FlowTable(max_flows=config.max_flows)
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
        counters["packets"] += 1
        if now >= self._next_expiry:
            self.flows.expire(now)
            self._next_expiry = now + 1.0
        try:
            seg = parse(packet, wire_len)
        except Truncated:
            counters["truncated"] += 1
            return Decision(DROP)
        except MalformedPacket:
            counters["malformed"] += 1
            return Decision(DROP)

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
                counters["foreign"] += 1
                return Decision(ACCEPT)
        else:
            from_client = from_client_side
        protocol = self._protocols.get(seg.dport if from_client else seg.sport)
        if protocol is None:
            if (seg.sport if from_client else seg.dport) in self._mail_ports:
                # e.g. "from the server" by its ports, but it came in on a client interface
                counters["wrong_direction"] += 1
                return Decision(DROP)
            counters["foreign"] += 1
            return Decision(ACCEPT)
        smtp = protocol == "smtp"
        normalised = None
        if seg.flags & URG:  # the receiver must read the urgent byte in line, as we do
            counters["urgent_cleared"] += 1
            packet = normalised = without_urgent(packet, seg)
            seg = parse(packet)

        if from_client:
            key = (seg.src, seg.sport, seg.dst, seg.dport)
        else:
            key = (seg.dst, seg.dport, seg.src, seg.sport)
        flow = self.flows.get(key)
        opening = from_client and seg.flags & (SYN | ACK | RST) == SYN
        if flow is None or (opening and (flow.state is State.CLOSED or flow.fate is not None)):
            # A client may reuse its port once the old connection is closed,
            # refused or let go: the new one is inspected from its start (a
            # settled flow's fate must never pass on to a new connection).
            if not opening:
                return self._untracked(seg, smtp, now)
            flow = self.flows.open(key, seg, now)
            flow.app = Session(protocol)
            counters["flows"] += 1

        if flow.fate is FAILED:
            self.flows.touch(flow, now)
            return self._refused_flow(seg, from_client)
        if flow.fate is BYPASSED:
            return Decision(BYPASS)

        outcome, data = flow.handle(seg, from_client)
        self.flows.touch(flow, now)  # after handle(): the state picks the timeout
        if outcome is Outcome.CONFLICT:
            counters["conflicts"] += 1
            return self._refuse(flow, seg, from_client, now,
                                "retransmission differs from the inspected bytes")
        if outcome is Outcome.GAP or outcome is Outcome.OVERFLOW:
            counters["held_back"] += 1
            return Decision(DROP)
        session: Session = flow.app
        decision = Decision(ACCEPT)
        if data:
            self._feed(flow, session, seg, data, from_client, now, decision)
            if decision.verdict is DROP:
                return decision
        if session.hidden and not from_client and seg.payload and flow.server is not None:
            decision.packet = self._hide(session, flow.server, seg, packet)
        if decision.packet is None:
            decision.packet = normalised
        if session.refusals is not None and seg.payload:
            self._rewrite(session.refusals, flow, seg, decision, packet, from_client)
        if decision.verdict is BYPASS:
            flow.fate = BYPASSED
            flow.release()  # what follows is no longer compared
        return decision

    # -- protocol events ----------------------------------------------------

    def _feed(self, flow: Flow, session: Session, seg: Segment, data: bytes,
              from_client: bool, now: float, decision: Decision) -> None:
        machine = session.machine
        client, server = flow.key[0], flow.key[2]
        try:
            events = machine.receive_client(data) if from_client else machine.receive_server(data)
        except ProtocolError as exc:
            self.counters["protocol_errors"] += 1
            if session.smtp:
                self._refuse(flow, seg, from_client, now, exc.hint, into=decision)
            else:
                decision.verdict = BYPASS
                decision.notices.append(Notice("error", client, server, time=now,
                                               reason=f"{session.protocol.upper()}: {exc.hint}; "
                                                      "not followed further"))
            return

        for event in events:
            if isinstance(event, RcptTo):
                verdict = self.policy.decide(
                    client, session.sender or "", event.recipient, now,
                    authenticated=session.authenticated and self.config.smtp_auth_relays,
                )
                failed = isinstance(verdict, Fail)
                self.counters["fail" if failed else "pass"] += 1
                decision.notices.append(Notice(
                    "fail" if failed else "pass", client, server, user=verdict.user or session.user,
                    sender=session.sender or "", recipient=event.recipient,
                    row=verdict.row, reason=verdict.reason, time=now))
                if failed:
                    if self._refuse_in_place(session, flow, event, data):
                        continue
                    self._refuse(flow, seg, from_client, now, None, into=decision,
                                 reply=SMTP_RELAY_DENIED)
                    return
            elif isinstance(event, MailFrom):
                session.sender = event.sender
            elif isinstance(event, SessionReset):
                session.sender = None
            elif isinstance(event, LoginSucceeded):
                self._login(session, client, server, event, now, decision)
            elif isinstance(event, LoginFailed):
                decision.notices.append(Notice("login-failed", client, server, user=event.user,
                                               reason=event.method, time=now))
            elif isinstance(event, TLSOffered):
                if not self._tls_allowed(session, client, now):
                    session.hidden.append((event.offset, event.length))
            elif isinstance(event, StartTLSRequested):
                if not self._tls_allowed(session, client, now):
                    self.counters["tls_refused"] += 1
                    self._refuse(flow, seg, from_client, now, "STARTTLS not allowed by policy",
                                 into=decision, reply=_NO_TLS[session.protocol],
                                 event="tls")
                    return
            elif isinstance(event, TLSStarted):
                decision.verdict = BYPASS
                decision.notices.append(Notice("tls", client, server,
                                               reason="TLS started; session no longer inspected", time=now))
        if session.refusals is not None and not from_client and flow.server is not None:
            assert isinstance(machine, SMTPMachine)  # only SMTP has recipients
            answered = [event for event in events if isinstance(event, Answered)]
            if not session.refusals.replies(data, flow.server.offset - len(data), answered,
                                            machine.reply_under_way):
                self._refuse(flow, seg, from_client, now,
                             "the MTA accepted the command a refused RCPT became", into=decision)
                return
        if not isinstance(machine, SMTPMachine) and machine.settled:
            decision.verdict = BYPASS

    def _login(self, session: Session, client: str, server: str,
               event: LoginSucceeded, now: float, decision: Decision) -> None:
        if session.smtp:
            session.authenticated = True
            session.user = event.user
            source = "smtp-auth"
        else:
            source = session.protocol
            try:
                self.logins.add(client, event.user, now, self.config.auth_ttl, source=source)
            except StoreError as exc:  # the session goes on; only the login is lost
                self.counters["store_errors"] += 1
                decision.notices.append(Notice("error", client, server, user=event.user,
                                               reason=f"login not recorded: {exc}", time=now))
                return
        self.counters["logins"] += 1
        decision.notices.append(Notice("login", client, server, user=event.user,
                                       reason=f"{source} {event.method}", time=now))

    def _tls_allowed(self, session: Session, client: str, now: float) -> bool:
        if session.smtp:
            return (self.config.smtp_starttls == "relay-clients"
                    and self.policy.may_relay(client, now))
        policy = self.config.pop3_stls if session.protocol == "pop3" else self.config.imap_starttls
        return policy == "allow"

    # -- refusing -----------------------------------------------------------

    def _refuse(self, flow: Flow, seg: Segment, from_client: bool, now: float, hint: str | None, *,
                into: Decision | None = None, reply: bytes | None = None,
                event: str = "reset") -> Decision:
        """Drop `seg`, tell the client why, and reset both ends.

        The reply goes to the client with FIN, so it reads a definite answer
        before the connection ends; the server is reset at the seq of the
        dropped segment, so the offending bytes never reach it (and after
        the bytes we passed, where that differs).
        """
        session: Session = flow.app
        decision = into if into is not None else Decision(DROP)
        decision.verdict = DROP
        decision.packet = None
        flow.fate = FAILED
        flow.release()
        # Both ends are reset: the flow is kept only to reset stragglers, as
        # long as a closed one (a flood of refusals would otherwise hold its
        # flows for the idle timeout).
        flow.state = State.CLOSED
        self.flows.touch(flow, now)
        if reply is None:
            reply = _REFUSED[session.protocol]
        if from_client:
            decision.inject += [craft.reply_and_close(seg, reply), craft.reset_receiver(seg)]
            # The server expects the seq after the bytes we passed (a resend that
            # overlaps them starts before it), or this segment's if those were lost
            # after us; only the exact one resets it (RFC 5961), so send both.
            passed = None if flow.client is None else (flow.client.next_seq - flow.client.added) & _MASK
            if passed is not None and passed != seg.seq:
                decision.inject.append(craft.reset_receiver(seg, passed))
        else:
            decision.inject += [craft.reset_receiver(seg), craft.reset_sender(seg)]
        if hint is not None:
            decision.notices.append(Notice(event, flow.key[0], flow.key[2], reason=hint, time=now))
        return decision

    def _refused_flow(self, seg: Segment, from_client: bool) -> Decision:
        """A refused session's stragglers: drop, and reset the client again."""
        decision = Decision(DROP)
        if from_client and not seg.flags & RST:
            decision.inject.append(craft.reset_sender(seg))
        return decision

    def _untracked(self, seg: Segment, smtp: bool, now: float) -> Decision:
        self.counters["untracked"] += 1
        if not smtp:
            return Decision(BYPASS)
        decision = Decision(DROP)
        if not seg.flags & (RST | SYN):
            decision.inject.append(craft.reset_sender(seg))
            if seg.flags & ACK:
                # Its answer, if the receiver is ahead of seg (say, a client
                # retransmitting data whose ACKs died with the old daemon), is
                # untracked too and brings it a RST that lands.
                decision.inject.append(craft.probe_receiver(seg))
            decision.inject.append(craft.reset_receiver(seg))
        return decision

    # -- refusing one recipient in place (refusal.py) --------------------------

    def _refuse_in_place(self, session: Session, flow: Flow, event: RcptTo, data: bytes) -> bool:
        """Refuse only this recipient, if the whole command line is in the
        new bytes: what went on to the MTA before cannot be rewritten."""
        if self.config.refusal != "recipient" or flow.client is None:
            return False
        if event.offset < flow.client.offset - len(data):
            return False
        assert isinstance(session.machine, SMTPMachine)  # only SMTP has recipients
        if session.refusals is None:
            session.refusals = Refusals()
        session.refusals.refuse(event)
        session.machine.watch(event.number)
        return True

    @staticmethod
    def _rewrite(refusals: Refusals, flow: Flow, seg: Segment, decision: Decision,
                 packet: bytes, from_client: bool) -> None:
        """Lay the refusals' rewrites over this segment, retransmissions too."""
        stream = flow.client if from_client else flow.server
        if decision.verdict is DROP or flow.client is None or stream is None:
            return
        # A SYN's data (TCP Fast Open) comes before the server has a stream.
        server = flow.server
        refusals.forget(flow.client.offset - flow.client.retained,
                        0 if server is None else server.offset - server.retained)
        changed = with_stream_bytes(decision.packet or packet, seg,
                                    payload_offset(stream, seg),
                                    refusals.client if from_client else refusals.server)
        if changed is not None:
            decision.packet = changed

    # -- hiding TLS offers --------------------------------------------------

    @staticmethod
    def _hide(session: Session, stream: Stream, seg: Segment, packet: bytes) -> bytes | None:
        """Overwrite hidden keywords with X in this server segment, if any."""
        return with_stream_bytes(packet, seg, payload_offset(stream, seg),
                                 ((offset, b"X" * length) for offset, length in session.hidden))
