"""TCP connection tracking: the two Streams of a connection, and the table.

A Flow judges each segment of its connection (`Flow.handle`) with the same
Outcomes as a Stream, adding what only the connection knows:

- the client's SYN and the server's SYN-ACK create the streams; a resent
  SYN with the same ISN is DUPLICATE, another ISN is CONFLICT; a SYN may
  carry data (TCP Fast Open), which is judged like any other data;
- except on a live connection: there a client SYN with another ISN changes
  nothing and is passed on (DUPLICATE), as RFC 5961 has the server answer it
  with a challenge ACK and keep the connection. A blind SYN on a client's
  ports therefore cannot end its session. Data or FIN on such a SYN is
  CONFLICT: a server that had lost the connection would take it for a new
  one's and read the data uninspected;
- no data is accepted from the client before it has acknowledged the
  server's SYN-ACK, nor from a side whose SYN we did not see (GAP), nor in a
  segment without ACK, which every receiver's TCP discards (CONFLICT);
- URG means nothing here: its bytes are judged in line like any others.
  That is only true for the receiver because the engine clears the flag and
  the urgent pointer of every segment it lets through (docs/security.md, "Urgent
  data"): a receiver that saw them would take the urgent byte out of the
  stream it hands the MTA;
- a RST closes the flow only at the exact sequence number the receiver's TCP
  accepts outright (RFC 5961), or, before the server's SYN-ACK, when it
  acknowledges the client's SYN. Either way it is DUPLICATE: forward it, the
  receiver's TCP judges it too. After an accepted RST anything carrying data,
  SYN or FIN is CONFLICT: the peer reset, so more data means a RST that
  reached us and not the receiver (a low TTL), an evasion;
- every ACK trims the bytes the other direction retains; a FIN from each
  side closes the flow (later data is CONFLICT, as the Stream judges it).

The FlowTable keeps flows in three LRU queues, one per timeout: half-open
(no handshake completed yet: `syn_timeout`), established (`idle_timeout`)
and closed (`closed_timeout`). `touch` moves a flow to the end of the queue
its state calls for, so each queue's head is its next flow to time out, and
`expire` only ever looks at heads: O(1) when nothing is due, O(1) amortised
per flow otherwise.

Eviction, when a new flow finds the table full: first the closed flow idle
longest (the engine makes a refused session one), then the half-open
flow idle longest, and only when neither exists the established flow idle
longest. A SYN flood therefore evicts its own
half-open flows: it cannot grow memory past `max_flows` and cannot push out
established sessions while any half-open flow is left to evict.

Memory: the bytes kept for comparing retransmissions (delivered, not yet
acknowledged) are bounded per stream (`stream.MAX_UNACKED`) and, over all
flows together, by the table's `RetainBudget` (`RETAIN_BUDGET`): past it,
new data is dropped (OVERFLOW) until ACKs free room. A flow gives its bytes
back when it leaves the table, and when the engine stops comparing it.

A connection that reuses the key of a closed flow starts with a client SYN
whose ISN differs, which the old flow calls CONFLICT: the caller opens a new
flow for it (`open` replaces whatever flow held the key).

Each flow carries the caller's state for its connection (`app`: the
engine's Session), which this module never reads.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from typing import Generic, TypeVar

from .packet import ACK, FIN, RST, SYN, Segment
from .stream import Outcome, RetainBudget, Stream, seq_diff

FlowKey = tuple[str, int, str, int]  # client addr, client port, server addr, server port
App = TypeVar("App")

#: flows `expire` removes per queue and call, bounding one call's latency
EXPIRE_BATCH = 1024
#: bytes all flows together may retain for comparison (see stream.RetainBudget)
RETAIN_BUDGET = 64 * 1024 * 1024

_NOTHING = (Outcome.DUPLICATE, b"")
_GAP = (Outcome.GAP, b"")
_CONFLICT = (Outcome.CONFLICT, b"")


def payload_offset(stream: Stream, seg: Segment) -> int:
    """The stream offset of `seg`'s first payload byte: a SYN's data (TCP
    Fast Open) starts one past the SYN's own sequence number."""
    return stream.offset_of((seg.seq + bool(seg.flags & SYN)) & 0xFFFFFFFF)


class State(enum.Enum):
    SYN_SENT = "syn-sent"        # the client's SYN seen, handshake not completed
    ESTABLISHED = "established"  # the client acknowledged the SYN-ACK, or the server spoke
    CLOSING = "closing"          # one side sent FIN
    CLOSED = "closed"            # both sent FIN, or an accepted RST


class Flow(Generic[App]):
    """One tracked connection. `app` is the caller's."""

    __slots__ = ("key", "client", "server", "state", "reset", "created", "last_seen",
                 "app", "_queue", "_budget")

    def __init__(self, key: FlowKey, now: float, app: App, budget: RetainBudget | None = None) -> None:
        self.key = key
        self._budget = budget
        self.client: Stream | None = None
        self.server: Stream | None = None
        self.state = State.SYN_SENT
        self.reset = False  # closed by a RST
        self.created = now
        self.last_seen = now
        self.app = app
        self._queue: OrderedDict[FlowKey, Flow[App]] | None = None

    def __repr__(self) -> str:
        return f"Flow({self.key!r}, {self.state.name})"

    def handle(self, seg: Segment, from_client: bool) -> tuple[Outcome, bytes]:
        """Judge one segment; NEW comes with the bytes to inspect.

        Afterwards the sender's stream's `added` says how far this segment
        moved it (0 unless NEW).
        """
        sender = self.client if from_client else self.server
        if sender is not None:
            sender.added = 0
        flags = seg.flags
        if flags & RST:
            self._rst(seg, from_client)
            return _NOTHING
        carries = bool(seg.payload or flags & (SYN | FIN))
        if flags & SYN and flags & FIN:
            return _CONFLICT
        if self.reset:
            return _CONFLICT if carries else _NOTHING

        opened = False
        if flags & SYN:
            if from_client and self._live_elsewhere(seg):
                return _CONFLICT if seg.payload or flags & FIN else _NOTHING
            stream, opened = self._syn(seg, from_client)
            if stream is None:
                return _CONFLICT
            seq = (seg.seq + 1) & 0xFFFFFFFF
        else:
            if not flags & ACK:
                return _CONFLICT if carries else _NOTHING
            stream = sender
            if stream is None:
                return _GAP if carries else _NOTHING
            if from_client and self.state is State.SYN_SENT:
                if self.server is None or not self.server.acks_sent(seg.ack):
                    return _GAP if carries else _NOTHING
                self.state = State.ESTABLISHED
            seq = seg.seq

        if flags & ACK:
            other = self.server if from_client else self.client
            if other is not None:
                other.acked(seg.ack)
        outcome, data = stream.receive(seq, seg.payload, bool(flags & FIN))
        if opened and outcome is Outcome.DUPLICATE:
            outcome = Outcome.NEW
        elif outcome is Outcome.NEW and not from_client and self.state is State.SYN_SENT:
            # The server only speaks once it took the handshake's last ACK, which
            # the rules may have kept from the queue (a pure ACK: rules/README.md).
            self.state = State.ESTABLISHED
        if outcome is Outcome.NEW and stream.fin:
            peer = self.server if from_client else self.client
            self.state = State.CLOSED if peer is not None and peer.fin else State.CLOSING
        return outcome, data

    def release(self) -> None:
        """Give back the bytes retained for comparison: once the flow leaves
        the table, or its fate no longer depends on what follows."""
        for stream in (self.client, self.server):
            if stream is not None:
                stream.release()

    def _live_elsewhere(self, seg: Segment) -> bool:
        """A client's SYN (no ACK) with another ISN while the connection is established."""
        return (not seg.flags & ACK and self.state in (State.ESTABLISHED, State.CLOSING)
                and self.client is not None and seg.seq != self.client.isn)

    def _syn(self, seg: Segment, from_client: bool) -> tuple[Stream | None, bool]:
        """The stream a SYN belongs to and whether it just opened it; None if bogus."""
        if from_client:
            if seg.flags & ACK:  # simultaneous open: not what a mail client does
                return None, False
            if self.client is None:
                self.client = Stream(seg.seq, budget=self._budget)
                return self.client, True
            return (self.client if seg.seq == self.client.isn else None), False
        if not seg.flags & ACK:
            return None, False
        if self.server is None:
            if self.client is None or not self.client.acks_sent(seg.ack):
                return None, False
            self.server = Stream(seg.seq, budget=self._budget)
            return self.server, True
        return (self.server if seg.seq == self.server.isn else None), False

    def _rst(self, seg: Segment, from_client: bool) -> None:
        sender = self.client if from_client else self.server
        if sender is not None:
            # Linux also takes a RST at the FIN's own seq (tcp_reset_check)
            d = seq_diff(seg.seq, sender.next_seq)
            valid = d == 0 or (d == -1 and sender.fin)
        else:  # the server refusing the SYN: valid if it acknowledges it
            valid = (not from_client and self.client is not None
                     and bool(seg.flags & ACK) and self.client.acks_sent(seg.ack))
        if valid:
            self.state = State.CLOSED
            self.reset = True


class FlowTable(Generic[App]):
    """Flows by key, bounded by `max_flows`; see the module for eviction."""

    def __init__(self, max_flows: int = 65536, syn_timeout: float = 30.0,
                 idle_timeout: float = 900.0, closed_timeout: float = 30.0,
                 retain_budget: int = RETAIN_BUDGET) -> None:
        self.max_flows = max_flows
        self.budget = RetainBudget(retain_budget)
        self.syn_timeout = syn_timeout
        self.idle_timeout = idle_timeout
        self.closed_timeout = closed_timeout
        self.evicted = 0
        self.expired = 0
        self._half: OrderedDict[FlowKey, Flow[App]] = OrderedDict()
        self._live: OrderedDict[FlowKey, Flow[App]] = OrderedDict()
        self._closed: OrderedDict[FlowKey, Flow[App]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._half) + len(self._live) + len(self._closed)

    def get(self, key: FlowKey) -> Flow[App] | None:
        return self._live.get(key) or self._half.get(key) or self._closed.get(key)

    def open(self, key: FlowKey, seg: Segment, now: float, app: App) -> Flow[App]:
        """A new flow for the client's SYN `seg`, carrying `app`, replacing any
        flow under `key`.

        The flow is empty: pass `seg` to its handle() like every other
        segment, which creates the client's stream.
        """
        if not seg.flags & SYN:
            raise ValueError("a flow opens with the client's SYN")
        self.remove(key)
        while len(self) >= self.max_flows and self._evict_one():
            pass
        flow = Flow(key, now, app, self.budget)
        self._half[key] = flow
        flow._queue = self._half
        return flow

    def touch(self, flow: Flow[App], now: float) -> None:
        """Record activity; call it after handle() so a state change moves
        the flow to its new timeout queue at once."""
        flow.last_seen = now
        queue = flow._queue
        if queue is None:  # removed, evicted or expired meanwhile
            return
        target, _ = self._class(flow.state)
        if target is queue:
            queue.move_to_end(flow.key)
        else:
            del queue[flow.key]
            target[flow.key] = flow
            flow._queue = target

    def remove(self, key: FlowKey) -> Flow[App] | None:
        for queue in (self._live, self._half, self._closed):
            flow = queue.pop(key, None)
            if flow is not None:
                flow._queue = None
                flow.release()
                return flow
        return None

    def expire(self, now: float, limit: int = EXPIRE_BATCH) -> list[Flow[App]]:
        """Remove and return the flows idle past their timeout (at most
        `limit` per queue and call)."""
        gone: list[Flow[App]] = []
        for queue in (self._closed, self._half, self._live):
            for _ in range(limit):
                if not queue:
                    break
                flow = next(iter(queue.values()))
                if now < flow.last_seen + self._class(flow.state)[1]:
                    break
                del queue[flow.key]
                flow._queue = None
                flow.release()
                gone.append(flow)
        self.expired += len(gone)
        return gone

    def _class(self, state: State) -> tuple[OrderedDict[FlowKey, Flow[App]], float]:
        """The queue a flow in `state` belongs to, and its timeout."""
        if state is State.CLOSED:
            return self._closed, self.closed_timeout
        if state is State.SYN_SENT:
            return self._half, self.syn_timeout
        return self._live, self.idle_timeout

    def _evict_one(self) -> bool:
        for queue in (self._closed, self._half, self._live):
            if queue:
                _, flow = queue.popitem(last=False)
                flow._queue = None
                flow.release()
                self.evicted += 1
                return True
        return False
