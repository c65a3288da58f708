"""The POP3 machine: learns logins from the two byte streams of a POP3 session.

Each client line becomes a pending command; each server reply answers the
oldest one (RFC 1939, RFC 2449 PIPELINING). A `+OK` is a login only as the
single-line reply to PASS (after a USER the server accepted), APOP, or the
last step of AUTH (RFC 5034). Multi-line responses are followed to their
final "." so that a "+OK" line inside a body is never taken for a reply.

While an AUTH step awaits its reply, later client lines are held unread: the
reply decides, in the server as here, whether the next line is a SASL
response (after a "+ " challenge) or a command.

A wrong LoginSucceeded grants relay, so wherever a server could read the
client's bytes differently from us, we refuse (ProtocolError) rather than
guess; the engine then stops following the flow, which can only lose a login:
- several commands in flight without PIPELINING in the server's CAPA: a
  server without it may drop pipelined lines unanswered and shift every reply;
- anything after STLS before its reply (command injection, CVE-2011-0411);
- client lines with control characters, empty commands, commands longer than
  RFC 2449 allows, and commands without arguments ended by a bare LF (Dovecot
  2.3's pop3-login reads the command name up to SP, CR or LF and then its
  arguments up to the next LF, so there "CAPA\\nPASS x\\r\\n" is one line);
- a +OK that no login explains: to PASS without an accepted USER, or to
  AUTH before any SASL response (the server may have read a mechanism list).

Once the server confirms a login, STLS or QUIT, nothing more can be learned:
the machine is settled and ignores further bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from .errors import ProtocolError
from .events import (
    Event,
    LoginFailed,
    LoginSucceeded,
    Quit,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from .machine import LineMachine
from .sasl import SaslLogin, login_name

MAX_COMMAND = 255
"""Octets in a command line with its CRLF (RFC 2449 section 4); AUTH lines and
SASL responses may be longer (RFC 5034) and are bounded by max_line only."""

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class _Status(Enum):
    OK = "+OK"
    ERR = "-ERR"
    MORE = "+"  # a SASL challenge, "+ " and base64: the client owes a response


_STATUS = {s.value.encode(): s for s in _Status}


class _Body(Enum):
    """What follows a +OK up to the "." line."""

    LINES = "lines"  # a listing or a message: skipped
    CAPA = "capa"    # capabilities: read for STLS and PIPELINING


class _Kind(Enum):
    """What a command awaiting its reply is, as far as the reply matters."""

    GREETING = "greeting"
    USER = "USER"
    PASS = "PASS"
    APOP = "APOP"
    AUTH = "AUTH"                      # no SASL response sent yet
    AUTH_ANSWERED = "AUTH answered"    # a response sent (initial, or to a challenge)
    AUTH_CANCELLED = "AUTH cancelled"  # the response was "*"
    CHALLENGE = "challenge"            # the server awaits a SASL response
    STLS = "STLS"
    QUIT = "QUIT"
    OTHER = "other"


_NAMES = {
    _Kind.GREETING: "the greeting", _Kind.USER: "USER", _Kind.PASS: "PASS", _Kind.APOP: "APOP",
    _Kind.AUTH: "AUTH", _Kind.AUTH_ANSWERED: "AUTH", _Kind.AUTH_CANCELLED: "AUTH",
    _Kind.CHALLENGE: "a SASL challenge", _Kind.STLS: "STLS", _Kind.QUIT: "QUIT", _Kind.OTHER: "a command",
}
"""A command of each kind, as an error names it."""


class _Action(Enum):
    NOTHING = "nothing"
    BODY = "body"            # a multi-line body follows, if the command has one
    USER = "user"            # the next PASS logs in as this USER
    NO_USER = "no user"      # the next PASS has no accepted USER
    CHALLENGE = "challenge"  # the client owes a SASL response
    LOGIN = "login"
    FAILED = "failed"
    TLS = "tls"
    CLOSED = "closed"


_OK, _ERR, _MORE = _Status.OK, _Status.ERR, _Status.MORE
_REPLIES: dict[tuple[_Kind, _Status], _Action] = {
    (_Kind.GREETING, _OK): _Action.NOTHING,
    (_Kind.GREETING, _ERR): _Action.NOTHING,
    (_Kind.USER, _OK): _Action.USER,
    (_Kind.USER, _ERR): _Action.NO_USER,
    (_Kind.PASS, _OK): _Action.LOGIN,
    (_Kind.PASS, _ERR): _Action.FAILED,
    (_Kind.APOP, _OK): _Action.LOGIN,
    (_Kind.APOP, _ERR): _Action.FAILED,
    # a +OK before any SASL response: the server may have read a mechanism list
    (_Kind.AUTH, _MORE): _Action.CHALLENGE,
    (_Kind.AUTH, _ERR): _Action.FAILED,
    (_Kind.AUTH_ANSWERED, _MORE): _Action.CHALLENGE,
    (_Kind.AUTH_ANSWERED, _OK): _Action.LOGIN,
    (_Kind.AUTH_ANSWERED, _ERR): _Action.FAILED,
    (_Kind.AUTH_CANCELLED, _ERR): _Action.FAILED,
    # while the server awaits a response only a -ERR, giving up, may come
    (_Kind.CHALLENGE, _ERR): _Action.FAILED,
    (_Kind.STLS, _OK): _Action.TLS,
    (_Kind.STLS, _ERR): _Action.NOTHING,
    (_Kind.QUIT, _OK): _Action.CLOSED,
    (_Kind.QUIT, _ERR): _Action.NOTHING,
    (_Kind.OTHER, _OK): _Action.BODY,
    (_Kind.OTHER, _ERR): _Action.NOTHING,
}
"""What the reply `status` to a command of `kind` does; unlisted: an error."""


# --- Commands awaiting a reply -------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Greeting:
    @property
    def kind(self) -> _Kind:
        return _Kind.GREETING


@dataclass(frozen=True, slots=True)
class _User:
    user: str | None

    @property
    def kind(self) -> _Kind:
        return _Kind.USER


@dataclass(frozen=True, slots=True)
class _Pass:
    @property
    def kind(self) -> _Kind:
        return _Kind.PASS


@dataclass(frozen=True, slots=True)
class _Apop:
    user: str | None

    @property
    def kind(self) -> _Kind:
        return _Kind.APOP


@dataclass(frozen=True, slots=True)
class _Auth:
    """One step of an AUTH exchange: the command itself, or a SASL response."""

    sasl: SaslLogin
    answered: bool          # the client has sent a response (initial, or to a challenge)
    cancelled: bool = False  # that response was "*"

    @property
    def kind(self) -> _Kind:
        if self.cancelled:
            return _Kind.AUTH_CANCELLED
        return _Kind.AUTH_ANSWERED if self.answered else _Kind.AUTH


@dataclass(frozen=True, slots=True)
class _Challenge:
    """The server sent a SASL challenge: it awaits the client's response."""

    sasl: SaslLogin

    @property
    def kind(self) -> _Kind:
        return _Kind.CHALLENGE


@dataclass(frozen=True, slots=True)
class _Stls:
    @property
    def kind(self) -> _Kind:
        return _Kind.STLS


@dataclass(frozen=True, slots=True)
class _Quit:
    @property
    def kind(self) -> _Kind:
        return _Kind.QUIT


@dataclass(frozen=True, slots=True)
class _Other:
    body: _Body | None  # what a +OK to it carries; None: a single line

    @property
    def kind(self) -> _Kind:
        return _Kind.OTHER


_Command = _Greeting | _User | _Pass | _Apop | _Auth | _Challenge | _Stls | _Quit | _Other


def _command(verb: bytes, arg: bytes) -> _Command:
    """The pending command for a client line (verb upper-cased)."""
    match verb:
        case b"USER":
            return _User(login_name(arg))
        case b"PASS":
            return _Pass()
        case b"APOP":
            return _Apop(login_name(arg.partition(b" ")[0]))
        case b"AUTH" if arg:
            mechanism, space, initial = arg.partition(b" ")
            sasl = SaslLogin(mechanism.decode("ascii", "replace"), initial if space else None)
            return _Auth(sasl, answered=bool(space))
        case b"AUTH":
            return _Other(_Body.LINES)  # lists the mechanisms
        case b"STLS":
            return _Stls()
        case b"QUIT":
            return _Quit()
        case b"CAPA":
            return _Other(_Body.CAPA)
        case b"LIST" | b"UIDL" | b"LANG":
            return _Other(None if arg else _Body.LINES)
        case b"RETR" | b"TOP":
            return _Other(_Body.LINES)
    return _Other(None)


class POP3Machine(LineMachine):
    """Both directions of one POP3 connection, fed as in-order stream bytes.

    `receive_client` and `receive_server` return the events the new bytes
    decide. Events of client lines held behind an AUTH step come from the
    `receive_server` call whose reply releases them. On a protocol violation
    they raise ProtocolError, and keep raising it on every later call.
    """

    __slots__ = ("max_pending", "_pending", "_user", "_body", "_pipelining")

    def __init__(self, max_line: int = 2048, max_pending: int = 100) -> None:
        self.max_pending = max_pending
        super().__init__(max_line)
        self._pending: list[_Command] = [_Greeting()]  # short: pop(0) is cheap
        self._user: _User | None = None           # the USER the next PASS logs in as
        self._body: _Body | None = None           # inside a multi-line response
        self._pipelining = False                  # the server's CAPA offered PIPELINING

    def __repr__(self) -> str:
        return f"<POP3Machine {self._state}, {len(self._pending)} pending>"

    # --- client -> server ----------------------------------------------------

    def _client_lines(self, out: list[Event]) -> None:
        buf = self._client
        while not self._settled and len(buf):
            last = self._pending[-1] if self._pending else None
            if isinstance(last, _Stls):
                raise ProtocolError("client sent data after STLS before the server answered")
            if isinstance(last, _Auth):
                if not self._pipelining:
                    raise ProtocolError("client sent data before the server answered AUTH "
                                        "without PIPELINING")
                if len(buf) > buf.max_line:
                    raise ProtocolError("client data piled up behind an AUTH step")
                return
            start = buf.offset
            line = buf.next_line()
            if line is None:
                return
            self._client_line(line, buf.offset - start == len(line) + 2, out)

    def _client_line(self, line: bytes, crlf: bool, out: list[Event]) -> None:
        if _CONTROL.search(line):
            raise ProtocolError("control character in a client line")
        if self._pending and isinstance(challenge := self._pending[-1], _Challenge):
            self._pending.pop()
            sasl = challenge.sasl
            cancelled = line == b"*"
            if not cancelled:
                sasl.client_response(line)
            self._push(_Auth(sasl, answered=True, cancelled=cancelled))
            return
        verb, space, arg = line.partition(b" ")
        verb = verb.upper()
        if not verb:
            raise ProtocolError("empty client command")
        if not space and not crlf:
            raise ProtocolError("command without arguments ended by a bare LF")
        if verb != b"AUTH" and len(line) + 2 > MAX_COMMAND:
            raise ProtocolError(f"command longer than {MAX_COMMAND} octets")
        command = _command(verb, arg)
        if isinstance(command, _Stls):
            out.append(StartTLSRequested())
        elif isinstance(command, _Quit):
            out.append(Quit())
        self._push(command)

    def _push(self, command: _Command) -> None:
        pending = self._pending
        in_flight = len(pending) - (1 if pending and isinstance(pending[0], _Greeting) else 0)
        if in_flight and not self._pipelining:
            raise ProtocolError("client pipelined commands but the server did not offer PIPELINING")
        if len(pending) >= self.max_pending:
            raise ProtocolError(f"more than {self.max_pending} commands awaiting replies")
        pending.append(command)

    # --- server -> client ----------------------------------------------------

    def _server_lines(self, out: list[Event]) -> None:
        buf = self._server
        while not self._settled:
            start = buf.offset
            line = buf.next_line()
            if line is None:
                return
            self._server_line(line, start, out)
            # a reply to AUTH may release client lines the next reply answers
            self._client_lines(out)

    def _server_line(self, line: bytes, start: int, out: list[Event]) -> None:
        if self._body is not None:
            if line == b".":
                self._body = None
            elif self._body is _Body.CAPA:
                self._capability(line.partition(b" ")[0].upper(), start, out)
            return
        status = _STATUS.get(line.partition(b" ")[0])
        if status is None:
            raise ProtocolError("server line is neither +OK, -ERR nor a SASL challenge")
        if not self._pending:
            if status is _Status.ERR:
                return  # a parting notice: idle timeout, too many bad commands
            raise ProtocolError("server reply with no command awaiting one")
        self._reply(self._pending.pop(0), status, out)

    def _capability(self, tag: bytes, start: int, out: list[Event]) -> None:
        if tag == b"STLS":
            out.append(TLSOffered(start, len(tag)))
        elif tag == b"PIPELINING":
            self._pipelining = True

    def _reply(self, command: _Command, status: _Status, out: list[Event]) -> None:
        """What `status` does as the reply to `command`: the table _REPLIES."""
        action = _REPLIES.get((command.kind, status))
        if action is None:
            raise ProtocolError(f"{status.value} is no valid reply to {_NAMES[command.kind]}")
        match action:
            case _Action.BODY:
                assert isinstance(command, _Other)
                self._body = command.body
            case _Action.USER:
                assert isinstance(command, _User)
                self._user = command
            case _Action.NO_USER:
                self._user = None
            case _Action.CHALLENGE:
                assert isinstance(command, _Auth)
                self._pending.append(_Challenge(command.sasl))
            case _Action.LOGIN | _Action.FAILED:
                ok = action is _Action.LOGIN
                if isinstance(command, _Pass):
                    user, self._user = self._user, None  # a PASS uses up its USER
                    if user is None and ok:
                        raise ProtocolError("server accepted PASS without an accepted USER")
                    self._login(ok, user.user if user else None, "USER", out)
                elif isinstance(command, _Apop):
                    self._login(ok, command.user, "APOP", out)
                else:
                    assert isinstance(command, _Auth | _Challenge)
                    self._login(ok, command.sasl.user, command.sasl.method, out)
            case _Action.TLS:
                out.append(TLSStarted())
                self._settled = True
            case _Action.CLOSED:
                self._settled = True
            case _Action.NOTHING:
                pass

    def _login(self, ok: bool, user: str | None, method: str, out: list[Event]) -> None:
        if ok:
            out.append(LoginSucceeded(user, method))
            self._settled = True
        else:
            out.append(LoginFailed(user, method))
