"""The one shape of the protocol machines (SMTP, POP3, IMAP), and the rule
they all keep: once a peer broke the protocol, the machine stays broken.

A machine is fed the in-order bytes of each direction of one connection and
returns the events they complete. It raises ProtocolError where a peer broke
the protocol, and from then on raises it again on every call: bytes after an
error could only be read differently by the server than by us. It is
`settled` once nothing more can be learned from the connection (TLS started,
a login confirmed, the session ended): further bytes are not read, and the
engine lets the rest of the flow leave the queue.

`PinnedMachine` keeps that rule once for all three: a subclass reads bytes
in `_read_client` and `_read_server`, and sets `_settled` once a reply
settles the session. `LineMachine` adds what POP3 and IMAP share: a line
buffer each way.
"""

from __future__ import annotations

from typing import Protocol

from .errors import ProtocolError
from .events import Event
from .linebuffer import LineBuffer


class Machine(Protocol):
    """What the engine asks of every protocol machine."""

    @property
    def settled(self) -> bool:
        """Nothing more can be learned: later bytes are not read."""
        ...

    def receive_client(self, data: bytes) -> list[Event]: ...
    def receive_server(self, data: bytes) -> list[Event]: ...


class PinnedMachine:
    """A machine that stays in error once a peer broke the protocol."""

    __slots__ = ("_error", "_settled")

    def __init__(self) -> None:
        self._error: str | None = None  # the hint of the violation, once there was one
        self._settled = False

    @property
    def settled(self) -> bool:
        return self._settled

    def receive_client(self, data: bytes) -> list[Event]:
        """New in-order client->server bytes; returns the events they complete."""
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._settled:
            return []
        try:
            return self._read_client(data)
        except ProtocolError as exc:
            self._error = exc.hint
            raise

    def receive_server(self, data: bytes) -> list[Event]:
        """New in-order server->client bytes; returns the events they complete."""
        if self._error is not None:
            raise ProtocolError(self._error)
        if self._settled:
            return []
        try:
            return self._read_server(data)
        except ProtocolError as exc:
            self._error = exc.hint
            raise

    def _read_client(self, data: bytes) -> list[Event]:
        raise NotImplementedError

    def _read_server(self, data: bytes) -> list[Event]:
        raise NotImplementedError

    @property
    def _state(self) -> str:
        """For a repr: "error" once pinned, else what the subclass says."""
        return "error" if self._error is not None else "settled" if self.settled else "learning"


class LineMachine(PinnedMachine):
    """POP3 and IMAP: lines each way, read until a reply settles the session.

    A subclass reads complete lines in `_client_lines` and `_server_lines`,
    appending the events they complete.
    """

    __slots__ = ("_client", "_server")

    def __init__(self, max_line: int) -> None:
        super().__init__()
        self._client = LineBuffer(max_line)
        self._server = LineBuffer(max_line)

    def _read_client(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        self._client.feed(data)
        self._client_lines(out)
        return out

    def _read_server(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        self._server.feed(data)
        self._server_lines(out)
        return out

    def _client_lines(self, out: list[Event]) -> None:
        raise NotImplementedError

    def _server_lines(self, out: list[Event]) -> None:
        raise NotImplementedError
