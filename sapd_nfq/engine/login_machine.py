"""What the POP3 and IMAP machines share: two line buffers, one phase, and
the facade that pins a machine in ERROR once a peer broke the protocol.

A subclass reads its lines in `_client_lines` and `_server_lines`, and moves
`_phase` to DONE once nothing more is to be learned (logged in, TLS started,
logged out): then the flow may leave the queue, and further bytes are not read.
"""

from __future__ import annotations

from enum import Enum

from .errors import ProtocolError
from .events import Event
from .linebuffer import LineBuffer


class Phase(Enum):
    LEARNING = "learning"
    DONE = "done"    # nothing more to learn
    ERROR = "error"


class LoginMachine:
    __slots__ = ("_client", "_server", "_phase", "_error")

    def __init__(self, max_line: int) -> None:
        self._client = LineBuffer(max_line)
        self._server = LineBuffer(max_line)
        self._phase = Phase.LEARNING
        self._error = ""

    @property
    def settled(self) -> bool:
        """Nothing more to learn: logged in, TLS started, or logged out."""
        return self._phase is Phase.DONE

    @property
    def opaque(self) -> bool:
        """Further bytes are not read (exactly when settled)."""
        return self._phase is Phase.DONE

    def receive_client(self, data: bytes) -> list[Event]:
        return self._receive(self._client, data)

    def receive_server(self, data: bytes) -> list[Event]:
        return self._receive(self._server, data)

    def _receive(self, buf: LineBuffer, data: bytes) -> list[Event]:
        if self._phase is Phase.DONE:
            return []
        if self._phase is Phase.ERROR:
            raise ProtocolError(self._error)
        out: list[Event] = []
        try:
            buf.feed(data)
            if buf is self._server:
                self._server_lines(out)
            else:
                self._client_lines(out)
        except ProtocolError as exc:
            self._phase = Phase.ERROR
            self._error = exc.hint
            raise
        return out

    def _client_lines(self, out: list[Event]) -> None:
        raise NotImplementedError

    def _server_lines(self, out: list[Event]) -> None:
        raise NotImplementedError
