"""What the engine returns for each packet: a verdict, packets to inject,
and notices (the things an administrator reads in the log or in `replay`).

A Decision is a value, built once when the engine is done with a packet; the
common ones (accept, bypass with nothing else to do) are shared, and each
kind of drop names its reason (core.py).

`carried` is the one place the `enforce` switch acts. Monitor mode
(`enforce = false`) is a function over the Decision, applied where the worker
carries decisions out: whatever the engine decided, the packet goes on as it
came (ACCEPT, or BYPASS, which also passes it), no replacement packet,
nothing injected. So no path of the engine, present or future, can drop,
rewrite, reset or answer past the switch: a path that adds one adds it to the
Decision, and the switch takes it out. The refusal notices become would-be
ones (`FAIL` -> `WOULD-FAIL`), with the same fields and row.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass, replace


class Verdict(enum.Enum):
    """What happens to the packet in the kernel (NFQUEUE's verdict)."""

    ACCEPT = "accept"
    DROP = "drop"
    #: accept, and take the rest of the flow out of the queue (connmark)
    BYPASS = "bypass"


#: a value written bare in a log line; any other is quoted (`_shown`)
_BARE = re.compile(r"[^\s'\"\\=]+")
#: fields always quoted: the null sender is '' and must show as such
_QUOTED = ("sender", "recipient")
#: the fields of a log line, in order, after the event
_LOGGED = ("client", "client_port", "server", "server_port", "user", "sender", "recipient",
           "row", "queue_id", "reason")


def _shown(name: str, value: object) -> str:
    """A field's value as a log line shows it: bare, or quoted as a Python
    string literal, so that a line is always one event and splits exactly
    into key=value pairs (a newline in a user name stays `\\n`)."""
    text = str(value)
    return repr(text) if name in _QUOTED or not _BARE.fullmatch(text) else text


@dataclass(frozen=True, slots=True)
class Notice:
    """One loggable fact. `event` is one of: login, login-failed, pass,
    fail, queued, tls, reset, error, and in monitor mode would-fail,
    would-tls, would-reset. Never carries a password.

    Its line (`str()`) is the event in upper case, then `key=value` for each
    field that has a value, in the order of `_LOGGED`; docs/first-day.md
    documents every field."""

    event: str
    client: str
    server: str = ""
    user: str | None = None
    sender: str | None = None
    recipient: str | None = None
    row: str | None = None
    reason: str | None = None
    time: float = 0.0
    client_port: int | None = None
    server_port: int | None = None
    #: the MTA's queue id of the message a `queued` notice reports
    queue_id: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    @property
    def source(self) -> str:
        """A login notice's source: the first word of its reason (pop3,
        imap, smtp-auth, log:<server>, hook)."""
        return (self.reason or "").split(" ")[0]

    def __str__(self) -> str:
        parts = [self.event.upper()]
        for name in _LOGGED:
            value = getattr(self, name)
            if value is not None and (value != "" or name in _QUOTED):
                parts.append(f"{name}={_shown(name, value)}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    #: the packet to pass instead of the original (a hidden TLS keyword, a
    #: refused recipient, a cleared urgent pointer)
    packet: bytes | None = None
    #: raw IP packets to send (a refusal to the client, resets)
    inject: tuple[bytes, ...] = ()
    notices: tuple[Notice, ...] = ()
    #: why the decision does more than pass the packet as it came (a drop, a
    #: rewrite, an injection), as the metrics name it; None when it does not
    reason: str | None = None

    @property
    def refuses(self) -> bool:
        """Whether carrying it out drops, rewrites, resets or answers anything."""
        return self.verdict is DROP or self.packet is not None or bool(self.inject)


ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP
BYPASS = Verdict.BYPASS

ACCEPTED = Decision(ACCEPT)
BYPASSED = Decision(BYPASS)


#: notices that stand for a refusal when the decision refuses: monitor mode
#: logs them as would-be ones. "tls" is also the notice of a TLS session
#: starting, which comes with a decision that refuses nothing.
REFUSING_EVENTS = ("fail", "tls", "reset")
WOULD = "would-"


def watched(decision: Decision) -> Decision:
    """What monitor mode carries out of `decision`: the packet as it came,
    and the refusals it stood for as would-be notices."""
    notices = decision.notices
    if decision.refuses or any(n.event == "fail" for n in notices):
        notices = tuple(replace(n, event=WOULD + n.event) if n.event in REFUSING_EVENTS else n
                        for n in notices)
    return Decision(BYPASS if decision.verdict is BYPASS else ACCEPT, notices=notices,
                    reason=decision.reason)


def carried(decision: Decision, enforce: bool) -> Decision:
    """The decision the worker carries out: the engine's when enforcing,
    else `watched(decision)`. The only place the switch is read."""
    return decision if enforce else watched(decision)
