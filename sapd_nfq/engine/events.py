"""Events the protocol machines emit, as frozen values.

The SMTP and POP3 machines turn the two byte streams of a connection into
these events; the engine turns events into verdicts. Offsets are positions in
the stream of the side named in the event (0 = first payload byte after the
SYN), so the engine can map them onto the segment being judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# --- SMTP: client commands -------------------------------------------------

@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM; `sender` is "" for the null sender <>."""

    sender: str
    params: str = ""


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO: one recipient, to be judged before the server sees it.

    `number` counts the command among all sent on the connection (0 first);
    `offset` and `length` place the command line in the client stream, line
    ending excluded, so the line can be overwritten in place.
    """

    recipient: str
    params: str = ""
    # where it is, not what it says: two RcptTo of one recipient are equal
    number: int = field(default=0, compare=False)
    offset: int = field(default=0, compare=False)
    length: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class Answered:
    """The server's final reply to command `number`, which the engine asked
    to watch: its three-digit `code`, and server-stream offsets from its
    first byte to past its end."""

    number: int
    code: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class SessionReset:
    """RSET, EHLO or HELO: the envelope so far is discarded."""

    command: str


@dataclass(frozen=True, slots=True)
class DataStarted:
    """The server answered DATA with 354: client bytes are now message text."""


@dataclass(frozen=True, slots=True)
class MessageEnded:
    """The client ended the message text (DATA's final dot or BDAT LAST)."""


@dataclass(frozen=True, slots=True)
class MessageQueued:
    """The server took the message (2xx to the final dot or BDAT LAST);
    `queue_id` is its queue id as the reply gave it, if it gave one in a
    form we know (smtp_grammar.queue_id)."""

    queue_id: str | None


# --- TLS, for both protocols -------------------------------------------------

@dataclass(frozen=True, slots=True)
class TLSOffered:
    """The server advertised STARTTLS (SMTP EHLO) or STLS (POP3 CAPA).

    `offset` is the server-stream offset of the keyword's first byte and
    `length` its length, so a policy that hides TLS can overwrite it in place.
    """

    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class StartTLSRequested:
    """The client sent STARTTLS / STLS. Judge it before the server sees it."""


@dataclass(frozen=True, slots=True)
class TLSStarted:
    """The server accepted STARTTLS / STLS: from here on the streams are opaque."""


# --- Logins: POP3, and SMTP AUTH --------------------------------------------

@dataclass(frozen=True, slots=True)
class LoginSucceeded:
    """The server confirmed a login (POP3 +OK, SMTP 235).

    `user` is the login name if the client sent one we could read, else None.
    `method` is "USER", "APOP" or "AUTH <MECHANISM>". Never a password.
    """

    user: str | None
    method: str


@dataclass(frozen=True, slots=True)
class LoginFailed:
    user: str | None
    method: str


@dataclass(frozen=True, slots=True)
class Quit:
    """The client sent QUIT."""


Event = (
    MailFrom | RcptTo | Answered | SessionReset | DataStarted | MessageEnded | MessageQueued | TLSOffered
    | StartTLSRequested | TLSStarted | LoginSucceeded | LoginFailed | Quit
)
