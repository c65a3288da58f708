"""The SMTP machine: both byte streams of one connection in, events out.

Everything that changes state lives in this file. The machine knows a
"client stream" and a "server stream", nothing of which side is ours, and it
never decides policy: it reads the conversation the way the MTA reads it and
says what happened.

The rules it keeps:

* Server replies drive the state. Each client command line waits in a
  queue for its final reply, in order (PIPELINING); the first reply of the
  connection is the greeting. The queue is bounded by the bytes of the
  commands in it (`MAX_PENDING_BYTES`), not by their number: a sending MTA
  may pipeline a thousand recipients. What a reply means depends on the
  command it answers (`_REPLIES`); a reply the table does not list, or one
  with no command waiting, is a protocol error.
* Client bytes are commands unless a reply said otherwise: 354 to DATA
  starts the message (which ends at a lone dot, judged as Postfix judges
  it), BDAT carries a byte count, 334 to AUTH makes the next line a SASL
  response, 220 to STARTTLS makes both streams opaque.
* Nothing may follow DATA or STARTTLS before its reply, and nothing may be
  pipelined behind an AUTH that the server then challenges: in each case
  the MTA and we could read those bytes differently.
* The machine follows the MTA's mail transaction from the replies, and
  refuses a MAIL the MTA could still see as nested: the MTA would keep its
  old sender while the engine judged the recipients against the new one.

Any violation raises ProtocolError and pins the machine in error
(machine.py). Events come back from the call that fed the byte completing
them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from . import smtp_grammar as grammar
from .errors import ProtocolError
from .events import (
    Answered,
    DataStarted,
    Event,
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
from .linebuffer import LineBuffer
from .machine import PinnedMachine
from .sasl import SaslLogin

MAX_LINE = 2048              # Postfix line_length_limit: longer lines are not read whole
MAX_PENDING_BYTES = 1 << 20  # commands awaiting replies: 1,000 RCPTs of 1012 octets (RFC 5321 + DSN) fit
_ENTRY_COST = 64             # a waiting command's memory, charged for a line shorter than that


class _Mode(enum.Enum):
    """What the next client bytes are."""

    COMMAND = "command"
    SASL = "SASL response"         # one line, answering a 334 challenge
    AWAIT_DATA = "DATA reply wait"  # the client must be silent
    AWAIT_TLS = "STARTTLS reply wait"
    MESSAGE = "message text"       # up to the lone dot
    CHUNK = "BDAT chunk"           # a counted run of bytes


class _Cmd(enum.Enum):
    """What a command waiting for its reply is, as far as replies matter."""

    GREETING = "the greeting"  # what the connection's first reply answers
    MAIL = "MAIL"
    RCPT = "RCPT"
    DATA = "DATA"
    DOT = "end of data"
    BDAT = "BDAT"
    BDAT_LAST = "BDAT LAST"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    EHLO = "EHLO"
    HELO = "HELO"
    RSET = "RSET"
    RSET_ARGS = "RSET with arguments"  # Postfix refuses it, keeping the transaction
    OTHER = "command"


class _Reply(enum.Enum):
    """What a final reply does to the command it answers."""

    OK = enum.auto()
    REFUSED = enum.auto()
    DATA_GO = enum.auto()       # 354: message text follows
    TLS_GO = enum.auto()        # 220: TLS handshake follows
    CHALLENGE = enum.auto()     # 334: a SASL response line follows
    LOGGED_IN = enum.auto()
    LOGIN_FAILED = enum.auto()


_PLAIN = {"2": _Reply.OK, "4": _Reply.REFUSED, "5": _Reply.REFUSED}

# (command, reply code) -> outcome: the exact code is looked up first, then
# its class ("2" for 2xx ...). Anything missing is a protocol error: a 354 to
# RCPT, say, means the queue and the MTA disagree.
_REPLIES: dict[tuple[_Cmd, str], _Reply] = {
    **{(cmd, code): reply for cmd in _Cmd if cmd not in (_Cmd.STARTTLS, _Cmd.AUTH)
       for code, reply in _PLAIN.items()},
    (_Cmd.DATA, "354"): _Reply.DATA_GO,
    (_Cmd.STARTTLS, "220"): _Reply.TLS_GO,
    (_Cmd.STARTTLS, "4"): _Reply.REFUSED,
    (_Cmd.STARTTLS, "5"): _Reply.REFUSED,
    (_Cmd.AUTH, "334"): _Reply.CHALLENGE,
    (_Cmd.AUTH, "235"): _Reply.LOGGED_IN,
    (_Cmd.AUTH, "4"): _Reply.LOGIN_FAILED,
    (_Cmd.AUTH, "5"): _Reply.LOGIN_FAILED,
}

# Whether the MTA has a mail transaction open after a command, on success and
# on failure; None keeps what was there. Where an MTA's choice is unsure, the
# table keeps an open transaction open: we then refuse a MAIL, never accept a
# nested one.
_CLOSE = False
_OPEN = True
_TRANSACTION: dict[_Cmd, tuple[bool | None, bool | None]] = {
    _Cmd.MAIL: (_OPEN, None),
    _Cmd.RSET: (_CLOSE, _CLOSE),       # a bare RSET cannot fail
    _Cmd.RSET_ARGS: (_CLOSE, None),
    _Cmd.EHLO: (_CLOSE, None),
    _Cmd.HELO: (_CLOSE, None),
    _Cmd.DOT: (_CLOSE, _CLOSE),        # the transaction ends with the message
    _Cmd.BDAT_LAST: (_CLOSE, None),
}

# The commands that may open a transaction, and those that close it whatever
# the reply; the rest keep an open one open on some outcome.
_OPENERS = frozenset(cmd for cmd, outcomes in _TRANSACTION.items() if _OPEN in outcomes)
_CLOSERS = frozenset(cmd for cmd, outcomes in _TRANSACTION.items() if outcomes == (_CLOSE, _CLOSE))
assert all(None in outcomes or cmd in _OPENERS
           for cmd, outcomes in _TRANSACTION.items() if cmd not in _CLOSERS)

_SUCCESS = {_Reply.OK, _Reply.DATA_GO, _Reply.TLS_GO, _Reply.LOGGED_IN}

# Message text ends at a line that is "." followed by any CRs (Postfix strips
# them all before LF), so `\n.\n`, `\n.\r\n`, `\r\n.\n` and `\r\n.\r\n` all
# end it. The scan keeps only where it stands in such a line.
_MID, _LINE_START, _DOT = range(3)


@dataclass(slots=True)
class _Pending:
    cmd: _Cmd
    cost: int  # bytes charged against the budget until the reply comes
    sasl: SaslLogin | None = None
    watched: bool = False  # its reply is reported (Answered)


class SMTPMachine(PinnedMachine):
    """One SMTP connection, fed the client and the server byte streams."""

    # Slots and a plain list for the reply queue: a daemon holds one machine
    # per tracked connection, tens of thousands of them.
    __slots__ = ("_client", "_server", "_max_pending_bytes", "_mode", "_pending", "_head",
                 "_pending_bytes", "_pushed", "_last_mail", "_last_close", "_greeted",
                 "_reply_code", "_reply_lines", "_reply_start", "_transaction", "_chunking", "_chunk_left",
                 "_chunk_last", "_scan")

    def __init__(self, max_line: int = MAX_LINE,
                 max_pending_bytes: int = MAX_PENDING_BYTES) -> None:
        super().__init__()
        self._client = LineBuffer(max_line)
        self._server = LineBuffer(max_line)
        self._max_pending_bytes = max_pending_bytes
        self._mode = _Mode.COMMAND
        # The queue is _pending[_head:]: answered commands are skipped over and
        # cut off in bulk, so a thousand replies cost a thousand steps.
        self._pending: list[_Pending] = []
        self._head = 0
        self._pending_bytes = 0
        # Commands numbered in the order sent: how many so far, and the number
        # of the last MAIL and of the last command that surely ends a
        # transaction (see _maybe_in_transaction).
        self._pushed = 0
        self._last_mail = -1
        self._last_close = -1
        self._greeted = False
        self._reply_code: bytes | None = None  # of a multiline reply under way
        self._reply_lines = 0
        self._reply_start = 0  # server-stream offset of that reply's first byte
        self._transaction = False  # the MTA's, as confirmed by its replies
        self._chunking = False     # the last EHLO reply offered CHUNKING
        self._chunk_left = 0
        self._chunk_last = False
        self._scan = _LINE_START

    @property
    def in_data(self) -> bool:
        """Client bytes are message text (after 354, or inside a BDAT chunk)."""
        return self._mode in (_Mode.MESSAGE, _Mode.CHUNK)

    def __repr__(self) -> str:
        state = self._mode.value if self._state == "learning" else self._state
        return f"<SMTPMachine {state}, {self._waiting} pending>"

    @property
    def reply_under_way(self) -> tuple[int, int] | None:
        """(number of the command the server answers next, server-stream
        offset where that reply starts), while a command waits: the server
        bytes from there on, complete lines or not, belong to its reply."""
        if not self._greeted or not self._waiting:
            return None
        start = self._server.offset if self._reply_code is None else self._reply_start
        return self._pushed - self._waiting, start

    def watch(self, number: int) -> None:
        """Report the final reply to command `number`, still waiting, as an
        Answered event (the engine rewrites it)."""
        first = self._pushed - self._waiting
        if not first <= number < self._pushed:
            raise ValueError(f"command {number} is not waiting for a reply")
        self._pending[self._head + number - first].watched = True

    @property
    def _waiting(self) -> int:
        """Commands awaiting a reply."""
        return len(self._pending) - self._head

    # --- feeding ------------------------------------------------------------

    def _read_client(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        if self._mode is _Mode.MESSAGE:
            if not self._message(data, events):
                return events
        else:
            self._client.feed(data)
        self._client_stream(events)
        return events

    def _read_server(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        self._server.feed(data)
        while not self._settled:  # TLS may start on any reply
            start = self._server.offset
            line = self._server.next_line()
            if line is None:
                break
            self._reply_line(line, start, events)
        return events

    # --- client stream --------------------------------------------------------

    def _client_stream(self, events: list[Event]) -> None:
        while True:
            mode = self._mode
            if mode is _Mode.CHUNK:
                self._chunk_left -= self._client.take(self._chunk_left)
                if self._chunk_left:
                    return
                self._mode = _Mode.COMMAND
                if self._chunk_last:
                    events.append(MessageEnded())
            elif mode in (_Mode.AWAIT_DATA, _Mode.AWAIT_TLS):
                if len(self._client):
                    raise ProtocolError(f"client sent bytes during the {mode.value}")
                return
            else:
                start = self._client.offset
                line = self._client.next_line()
                if line is None:
                    return
                if mode is _Mode.SASL:
                    self._sasl_response(line)
                else:
                    self._command(line, start, self._client.offset - start, events)

    def _message(self, data: bytes, events: list[Event]) -> bool:
        """Scan message text for its end; True if it ended (the rest of
        `data` is then in the client buffer, to be read as commands)."""
        end = self._message_end(data)
        self._client.feed(data)
        self._client.take(len(data) if end is None else end)
        if end is None:
            return False
        self._mode = _Mode.COMMAND
        self._push(_Cmd.DOT, 0)
        events.append(MessageEnded())
        return True

    def _message_end(self, data: bytes) -> int | None:
        """Index just past the terminating LF in data, or None."""
        at, i, n = self._scan, 0, len(data)
        # The end is a line that starts with a dot, and a line starts after a LF (or
        # where the scan is at one): data without either cannot hold the end, and
        # leaves the scan at a line's start if it ends with a LF, mid-line if not.
        if n and at != _DOT and b"\n." not in data and not (at == _LINE_START
                                                            and data[0] == 0x2E):
            self._scan = _LINE_START if data[-1] == 0x0A else _MID
            return None
        while i < n:
            if at == _MID:
                lf = data.find(b"\n", i)
                if lf < 0:
                    break
                i, at = lf + 1, _LINE_START
                continue
            c = data[i]
            i += 1
            if at == _LINE_START:
                at = _DOT if c == 0x2E else _LINE_START if c == 0x0A else _MID
            elif c == 0x0A:
                return i
            elif c != 0x0D:
                at = _MID
        self._scan = at
        return None

    def _sasl_response(self, line: bytes) -> None:
        sasl = self._pending[self._head].sasl
        assert sasl is not None  # SASL mode is entered only on a 334 to AUTH
        sasl.client_response(line)
        self._mode = _Mode.COMMAND

    def _command(self, line: bytes, start: int, size: int, events: list[Event]) -> None:
        """One command line at client-stream offset `start`, `size` bytes on
        the wire with its line ending."""
        if b"\0" in line:
            raise ProtocolError("NUL byte in a command line")
        verb, args = grammar.split_command(line)
        if verb == b"MAIL":
            sender, params = grammar.mail_from(args)
            if self._maybe_in_transaction():
                raise ProtocolError("MAIL while the previous transaction may still be open")
            self._push(_Cmd.MAIL, size)
            events.append(MailFrom(sender, params))
        elif verb == b"RCPT":
            recipient, params = grammar.rcpt_to(args)
            number = self._pushed
            self._push(_Cmd.RCPT, size)
            events.append(RcptTo(recipient, params, number, start, len(line)))
        elif verb == b"DATA":
            self._push(_Cmd.DATA, size)
            self._mode = _Mode.AWAIT_DATA
        elif verb == b"BDAT":
            chunk, last = grammar.bdat(args)
            if not self._chunking:
                raise ProtocolError("BDAT, but the server did not offer CHUNKING")
            self._push(_Cmd.BDAT_LAST if last else _Cmd.BDAT, size)
            self._mode = _Mode.CHUNK
            self._chunk_left, self._chunk_last = chunk, last
        elif verb == b"STARTTLS":
            self._push(_Cmd.STARTTLS, size)
            self._mode = _Mode.AWAIT_TLS
            events.append(StartTLSRequested())
        elif verb == b"AUTH":
            exchange = grammar.auth(args)
            if exchange is None:
                self._push(_Cmd.OTHER, size)
            else:
                self._push(_Cmd.AUTH, size, SaslLogin(*exchange))
        elif verb in (b"EHLO", b"HELO", b"RSET"):
            cmd = _Cmd.RSET_ARGS if verb == b"RSET" and args.strip() else _Cmd(verb.decode())
            self._push(cmd, size)
            events.append(SessionReset(verb.decode()))
        elif verb == b"QUIT":
            self._push(_Cmd.OTHER, size)
            events.append(Quit())
        else:
            self._push(_Cmd.OTHER, size)  # the MTA answers unknown verbs too

    def _push(self, cmd: _Cmd, size: int, sasl: SaslLogin | None = None) -> None:
        cost = max(size, _ENTRY_COST)
        if self._pending_bytes + cost > self._max_pending_bytes:
            raise ProtocolError(f"commands awaiting a reply exceed {self._max_pending_bytes} bytes")
        self._pending_bytes += cost
        self._pending.append(_Pending(cmd, cost, sasl))
        if cmd in _OPENERS:
            self._last_mail = self._pushed
        elif cmd in _CLOSERS:
            self._last_close = self._pushed
        self._pushed += 1

    def _pop(self) -> _Pending:
        """The oldest waiting command, now answered."""
        pending = self._pending[self._head]
        self._head += 1
        self._pending_bytes -= pending.cost
        if self._head == len(self._pending):
            self._pending.clear()  # nothing waits: keep no storage
            self._head = 0
        elif self._head * 2 > len(self._pending):
            del self._pending[:self._head]
            self._head = 0
        return pending

    def _maybe_in_transaction(self) -> bool:
        """Could the MTA have a transaction open once it has answered every
        command sent so far, whichever way it answers them?

        After a waiting command that closes it either way, only a later MAIL
        can open it; with no such command waiting, it stays possibly open if
        it is open now or a MAIL waits. Every other command keeps an open
        transaction possible (_TRANSACTION keeps it on one outcome at least).
        So the answer needs no walk over the queue, however long it is.
        """
        first = self._pushed - self._waiting  # the number of the oldest waiting command
        if self._last_mail >= first and self._last_mail > self._last_close:
            return True
        return self._last_close < first and self._transaction

    # --- server stream --------------------------------------------------------

    def _reply_line(self, line: bytes, start: int, events: list[Event]) -> None:
        code, final, text, text_at = grammar.reply(line)
        if self._reply_code is None:
            if self._greeted and not self._waiting:
                raise ProtocolError(f"server reply {code.decode()} with no command waiting")
            self._reply_code, self._reply_lines, self._reply_start = code, 0, start
        elif code != self._reply_code:
            raise ProtocolError("reply code changed within a multiline reply")
        if self._greeted and self._pending[self._head].cmd is _Cmd.EHLO and code == b"250":
            self._capability(text, start + text_at, events)
        self._reply_lines += 1
        if final:
            self._reply_code = None
            self._final_reply(code.decode(), text, events)

    def _capability(self, text: bytes, text_offset: int, events: list[Event]) -> None:
        """One line of a 250 reply to EHLO; the first line names the host."""
        if self._reply_lines == 0:
            self._chunking = False
            return
        keyword = grammar.ehlo_keyword(text)
        if keyword is None:
            return
        name, index = keyword
        if name == b"STARTTLS":
            events.append(TLSOffered(offset=text_offset + index, length=len(name)))
        elif name == b"CHUNKING":
            self._chunking = True

    def _final_reply(self, code: str, text: bytes, events: list[Event]) -> None:
        """The last line of a reply: its `code`, and `text` after it."""
        if not self._greeted:
            if _lookup(_Cmd.GREETING, code) is None:
                raise ProtocolError(f"greeting with reply code {code}")
            self._greeted = True
            return
        pending = self._pending[self._head]
        outcome = _lookup(pending.cmd, code)
        if outcome is None:
            raise ProtocolError(f"reply {code} does not answer {pending.cmd.value}")
        if pending.watched:
            events.append(Answered(self._pushed - self._waiting, code,
                                   self._reply_start, self._server.offset))
        if outcome is _Reply.CHALLENGE:
            if self._waiting > 1:
                raise ProtocolError("commands pipelined behind a challenged AUTH")
            self._mode = _Mode.SASL
            return
        self._pop()
        after = _TRANSACTION.get(pending.cmd, (None, None))[outcome not in _SUCCESS]
        if after is not None:
            self._transaction = after
        if pending.cmd in (_Cmd.DATA, _Cmd.STARTTLS) or self._mode is _Mode.SASL:
            self._mode = _Mode.COMMAND  # the wait for this reply is over
        if outcome is _Reply.DATA_GO:
            self._mode, self._scan = _Mode.MESSAGE, _LINE_START
            events.append(DataStarted())
        elif outcome is _Reply.OK and pending.cmd in (_Cmd.DOT, _Cmd.BDAT_LAST):
            events.append(MessageQueued(grammar.queue_id(text)))
        elif outcome is _Reply.TLS_GO:
            self._settled = True  # TLS: nothing more is parsed
            events.append(TLSStarted())
        elif pending.sasl is not None:
            event: type[LoginSucceeded | LoginFailed] = (
                LoginSucceeded if outcome is _Reply.LOGGED_IN else LoginFailed)
            events.append(event(pending.sasl.user, pending.sasl.method))


def _lookup(cmd: _Cmd, code: str) -> _Reply | None:
    return _REPLIES.get((cmd, code)) or _REPLIES.get((cmd, code[0]))
