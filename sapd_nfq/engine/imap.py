"""The IMAP machine: learns logins from the two byte streams of an IMAP session.

Each client command carries a tag; the server's tagged reply to it says how
it ended (RFC 9051). A login is the tagged OK to LOGIN or AUTHENTICATE, and
nothing else: an untagged OK, the OK of another tag, NO and BAD learn nothing.
What each tagged reply means is the table _TAGGED below; a reply it does not
list is a protocol error.

Literals (`{n}`, and the non-synchronising `{n+}` and `{n-}`) are followed on
both sides, so a literal's content is never read as a command or a reply. A
client that sends a synchronising literal waits for the server's "+": until
then its bytes are held unread, as the server holds them, and a server that
answers the command instead (refusing the literal) leaves the two readings
uncertain, so we stop. Client bytes behind an AUTHENTICATE are held alike: the
server's "+" or tagged reply decides whether the next line is a SASL response
or a command.

A wrong LoginSucceeded grants relay, so wherever a server could read the
client's bytes differently from us, we refuse (ProtocolError) rather than
guess; the engine then stops following the flow, which can only lose a login:
an invalid or repeated tag, control characters, a literal marker where a
server could read it either way (`x{5}`, `~{5}`), a literal longer than a
line before login, anything after STARTTLS before its reply (CVE-2011-0411),
and a reply to a tag no command carries.

Once the server confirms a login, STARTTLS or LOGOUT (or greets with PREAUTH
or BYE), nothing more can be learned: the machine is settled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# tag = 1*<ASTRING-CHAR except "+">: no SP, CTL, ( ) { % * " \ or +
_TAG = re.compile(rb'[^\x00-\x20\x7f(){%*"\\+]+')
# a literal marker ends the line: {n} waits for "+", {n+} and {n-} do not
_LITERAL_END = re.compile(rb"(~?)\{(\d{1,10})([+-]?)\}$")
_STARTTLS = re.compile(rb"(?<![^ \[])STARTTLS(?![^ \]])", re.IGNORECASE)
_STATUS_WORDS = frozenset((b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"))


class _Status(Enum):
    OK = "OK"
    NO = "NO"
    BAD = "BAD"


_STATUS = {s.value.encode(): s for s in _Status}


class _Kind(Enum):
    """What a pending command is, as far as its tagged reply matters."""

    LOGIN = "LOGIN"
    AUTHENTICATE = "AUTHENTICATE"      # awaiting "+" or the tagged reply
    CHALLENGED = "a SASL challenge"    # the server sent "+": the client owes a response
    CANCELLED = "a cancelled AUTHENTICATE"  # the client answered "*"
    STARTTLS = "STARTTLS"
    LOGOUT = "LOGOUT"
    OTHER = "a command"


class _Action(Enum):
    NOTHING = "nothing"
    LOGIN = "login"
    FAILED = "failed"
    TLS = "tls"
    CLOSED = "closed"


_ANY = (_Status.OK, _Status.NO, _Status.BAD)
_TAGGED: dict[tuple[_Kind, _Status], _Action] = {
    (_Kind.LOGIN, _Status.OK): _Action.LOGIN,
    (_Kind.LOGIN, _Status.NO): _Action.FAILED,
    (_Kind.LOGIN, _Status.BAD): _Action.FAILED,
    (_Kind.AUTHENTICATE, _Status.OK): _Action.LOGIN,
    (_Kind.AUTHENTICATE, _Status.NO): _Action.FAILED,
    (_Kind.AUTHENTICATE, _Status.BAD): _Action.FAILED,
    # an OK while the server awaits a response, or to a cancelled exchange, is no login
    (_Kind.CHALLENGED, _Status.NO): _Action.FAILED,
    (_Kind.CHALLENGED, _Status.BAD): _Action.FAILED,
    (_Kind.CANCELLED, _Status.NO): _Action.FAILED,
    (_Kind.CANCELLED, _Status.BAD): _Action.FAILED,
    (_Kind.STARTTLS, _Status.OK): _Action.TLS,
    (_Kind.STARTTLS, _Status.NO): _Action.NOTHING,
    (_Kind.STARTTLS, _Status.BAD): _Action.NOTHING,
    (_Kind.LOGOUT, _Status.OK): _Action.CLOSED,
    (_Kind.LOGOUT, _Status.NO): _Action.NOTHING,
    (_Kind.LOGOUT, _Status.BAD): _Action.NOTHING,
    **{(_Kind.OTHER, status): _Action.NOTHING for status in _ANY},
}
"""What the tagged reply `status` to a command of `kind` means; unlisted: an error."""


@dataclass(slots=True)
class _Command:
    tag: bytes
    kind: _Kind
    args: int = 0                   # arguments read so far
    user: str | None = None         # LOGIN's first argument
    sasl: SaslLogin | None = None   # AUTHENTICATE's exchange
    complete: bool = False          # its last line has been read
    broken: bool = False            # unparsable arguments: the server will refuse it
    _mechanism: bytes = field(default=b"", repr=False)

    @property
    def method(self) -> str:
        if self.sasl is not None:
            return f"AUTHENTICATE {self.sasl.mechanism}"
        return self.kind.value


_VERBS = {b"LOGIN": _Kind.LOGIN, b"AUTHENTICATE": _Kind.AUTHENTICATE,
          b"STARTTLS": _Kind.STARTTLS, b"LOGOUT": _Kind.LOGOUT}


def _tokens(segment: bytes) -> tuple[list[bytes], bool]:
    """The atoms and quoted strings of one line segment (parentheses dropped),
    and whether a quoted string was left open."""
    out: list[bytes] = []
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c in b" ()":
            i += 1
        elif c == 0x22:  # a quoted string, \ escaping " and \
            value = bytearray()
            i += 1
            while i < n and segment[i] != 0x22:
                if segment[i] == 0x5C and i + 1 < n:
                    i += 1
                value.append(segment[i])
                i += 1
            if i >= n:
                return out, True
            out.append(bytes(value))
            i += 1
        else:
            end = i
            while end < n and segment[end] not in b' ()"':
                end += 1
            out.append(segment[i:end])
            i = end
    return out, False


def _literal(segment: bytes, continued: bool) -> tuple[bytes, int, bool] | None:
    """(the segment before the marker, literal length, synchronising) if the
    segment ends with a literal marker outside a quoted string."""
    match = _LITERAL_END.search(segment)
    if match is None:
        return None
    head = segment[:match.start()]
    if _tokens(head)[1]:
        return None  # inside a quoted string left open: the server refuses the line
    # after SP or "(", or opening the arguments; never glued to an atom or a literal
    placed = head[-1:] in (b" ", b"(") if head else not continued
    if match.group(1) or not placed:
        raise ProtocolError("a literal marker a server could read either way")
    return head, int(match.group(2)), not match.group(3)


class IMAPMachine(LineMachine):
    """Both directions of one IMAP connection, fed as in-order stream bytes.

    `receive_client` and `receive_server` return the events the new bytes
    decide. Events of client lines held behind a literal or an AUTHENTICATE
    come from the `receive_server` call whose reply releases them. On a
    protocol violation they raise ProtocolError, and keep raising it.
    """

    __slots__ = ("max_pending", "_pending", "_current", "_literal", "_keep", "_await_plus",
                 "_challenged", "_server_literal", "_server_rest", "_greeted")

    def __init__(self, max_line: int = 2048, max_pending: int = 100) -> None:
        self.max_pending = max_pending
        super().__init__(max_line)
        self._pending: dict[bytes, _Command] = {}
        self._current: _Command | None = None     # a command whose literal comes next
        self._literal = 0                         # client literal octets still to come
        self._keep: bytearray | None = None       # that literal's content, if it is LOGIN's user
        self._await_plus = False                  # the client waits for "+" to send it
        self._challenged: _Command | None = None  # the AUTHENTICATE a "+" challenged
        self._server_literal = 0
        self._server_rest = False
        self._greeted = False

    def __repr__(self) -> str:
        return f"<IMAPMachine {self._state}, {len(self._pending)} pending>"

    # --- client -> server ----------------------------------------------------

    def _client_lines(self, out: list[Event]) -> None:
        buf = self._client
        while not self._settled and len(buf):
            if self._await_plus or self._in_flight(_Kind.AUTHENTICATE, _Kind.CANCELLED):
                if len(buf) > buf.max_line:
                    raise ProtocolError("client data piled up awaiting the server")
                return  # the server's next reply decides how these bytes read
            if self._in_flight(_Kind.STARTTLS):
                raise ProtocolError("client sent data after STARTTLS before the server answered")
            if self._literal:
                content = buf.read(self._literal)
                self._literal -= len(content)
                if self._keep is not None:
                    self._keep += content
                if not self._literal:
                    self._literal_read()
                continue
            line = buf.next_line()
            if line is None:
                return
            if _CONTROL.search(line):
                raise ProtocolError("control character in a client line")
            if self._challenged is not None:
                self._sasl_response(self._challenged, line)
            elif self._current is not None:
                self._segment(self._current, line, continued=True, out=out)
            else:
                self._command(line, out)

    def _in_flight(self, *kinds: _Kind) -> bool:
        return any(c.kind in kinds and c.complete for c in self._pending.values())

    def _command(self, line: bytes, out: list[Event]) -> None:
        tag, space, rest = line.partition(b" ")
        if not _TAG.fullmatch(tag):
            raise ProtocolError("client command without a valid tag")
        if tag in self._pending:
            raise ProtocolError("client reused a tag still awaiting its reply")
        if len(self._pending) >= self.max_pending:
            raise ProtocolError(f"more than {self.max_pending} commands awaiting replies")
        verb, _, args = rest.partition(b" ")
        if b"{" in verb:
            raise ProtocolError("a literal where the command name belongs")
        command = _Command(tag, _VERBS.get(verb.upper(), _Kind.OTHER))
        self._pending[tag] = command
        if command.kind is _Kind.STARTTLS:
            out.append(StartTLSRequested())
        elif command.kind is _Kind.LOGOUT:
            out.append(Quit())
        self._segment(command, args, continued=False, out=out)

    def _segment(self, command: _Command, segment: bytes, *, continued: bool,
                 out: list[Event]) -> None:
        """One line of `command`'s arguments, up to its end or its next literal."""
        marker = _literal(segment, continued)
        head = segment if marker is None else marker[0]
        tokens, open_quote = _tokens(head)
        command.broken |= open_quote
        for token in tokens:
            self._argument(command, token)
        if marker is None:
            self._current = None
            self._completed(command)
            return
        _, size, sync = marker
        if size > self._client.max_line:
            raise ProtocolError(f"literal longer than {self._client.max_line} octets before login")
        self._current = command
        self._literal = size
        self._await_plus = sync
        # only LOGIN's user name is kept; a password literal is skipped unseen
        self._keep = bytearray() if command.kind is _Kind.LOGIN and command.args == 0 else None
        if not size:
            self._literal_read()

    def _literal_read(self) -> None:
        command = self._current
        assert command is not None
        if self._keep is not None:
            command.user = login_name(bytes(self._keep))
            self._keep = None
        command.args += 1

    def _argument(self, command: _Command, token: bytes) -> None:
        if command.kind is _Kind.LOGIN and command.args == 0:
            command.user = login_name(token)
        elif command.kind is _Kind.AUTHENTICATE:
            if command.args == 0:
                command._mechanism = token
            elif command.args == 1:
                command.sasl = SaslLogin(command._mechanism.decode("ascii", "replace"), token)
        command.args += 1

    def _completed(self, command: _Command) -> None:
        command.complete = True
        if command.kind is _Kind.AUTHENTICATE:
            if command.args == 0 or command.args > 2:
                command.broken = True
            elif command.sasl is None:
                command.sasl = SaslLogin(command._mechanism.decode("ascii", "replace"))
        elif command.kind is _Kind.LOGIN and command.args != 2:
            command.broken = True

    def _sasl_response(self, command: _Command, line: bytes) -> None:
        self._challenged = None
        if line == b"*":
            command.kind = _Kind.CANCELLED
            return
        assert command.sasl is not None
        command.sasl.client_response(line)
        command.kind = _Kind.AUTHENTICATE

    # --- server -> client ----------------------------------------------------

    def _server_lines(self, out: list[Event]) -> None:
        buf = self._server
        while not self._settled:
            if self._server_literal:
                self._server_literal -= buf.take(self._server_literal)
                if self._server_literal:
                    return
                self._server_rest = True
            elif self._server_rest:  # the rest of a data response after its literal
                line = buf.next_line()
                if line is None:
                    return
                self._server_rest = False
                self._data_line(line, continued=True)
            else:
                start = buf.offset
                line = buf.next_line()
                if line is None:
                    return
                self._server_line(line, start, out)
            # a reply may release client bytes it decides how to read
            self._client_lines(out)

    def _data_line(self, line: bytes, *, continued: bool) -> None:
        """An untagged data response may carry literals: skip their content."""
        marker = _literal(line, continued)
        if marker is not None:
            self._server_literal = marker[1]

    def _server_line(self, line: bytes, start: int, out: list[Event]) -> None:
        if _CONTROL.search(line):
            raise ProtocolError("control character in a server line")
        tag, _, rest = line.partition(b" ")
        if tag == b"+":
            self._continuation()
            return
        word, _, text = rest.partition(b" ")
        word = word.upper()
        if tag == b"*":
            if word == b"CAPABILITY":
                self._capabilities(rest, start + 2, out)
            elif word == b"OK" and text[:12].upper() == b"[CAPABILITY ":
                self._capabilities(text, start + len(line) - len(text), out)
            if not self._greeted:
                self._greeting(word)
            elif word not in _STATUS_WORDS:
                self._data_line(line, continued=False)
            return
        if not self._greeted:
            raise ProtocolError("tagged reply before the server's greeting")
        command = self._pending.pop(tag, None)
        status = _STATUS.get(word)
        if command is None or status is None:
            raise ProtocolError("server reply that answers no command")
        if not command.complete:
            raise ProtocolError("server answered a command before its literal")
        if status is _Status.OK and text[:12].upper() == b"[CAPABILITY ":
            self._capabilities(text, start + len(line) - len(text), out)
        action = _TAGGED.get((command.kind, status))
        if action is None:
            raise ProtocolError(f"{status.value} is no valid reply to {command.kind.value}")
        if self._challenged is command:
            self._challenged = None
        self._act(action, command, out)

    def _greeting(self, word: bytes) -> None:
        if word == b"OK":
            self._greeted = True
        elif word in (b"PREAUTH", b"BYE"):
            self._settled = True  # logged in without a login, or turned away
        else:
            raise ProtocolError("server greeting is neither OK, PREAUTH nor BYE")

    def _continuation(self) -> None:
        if self._await_plus:
            self._await_plus = False
            return
        waiting = [c for c in self._pending.values()
                   if c.kind is _Kind.AUTHENTICATE and c.complete]
        if not waiting or waiting[-1].broken or self._challenged is not None:
            raise ProtocolError("continuation request with nothing awaiting one")
        self._challenged = waiting[-1]
        waiting[-1].kind = _Kind.CHALLENGED

    def _capabilities(self, text: bytes, offset: int, out: list[Event]) -> None:
        if text.startswith(b"["):
            text = text.partition(b"]")[0]  # the response code, not the free text after it
        for match in _STARTTLS.finditer(text):
            out.append(TLSOffered(offset + match.start(), len(match.group())))

    def _act(self, action: _Action, command: _Command, out: list[Event]) -> None:
        match action:
            case _Action.LOGIN:
                user = command.sasl.user if command.sasl is not None else command.user
                out.append(LoginSucceeded(None if command.broken else user, command.method))
                self._settled = True
            case _Action.FAILED:
                user = command.sasl.user if command.sasl is not None else command.user
                out.append(LoginFailed(user, command.method))
            case _Action.TLS:
                out.append(TLSStarted())
                self._settled = True
            case _Action.CLOSED:
                self._settled = True
            case _Action.NOTHING:
                pass
