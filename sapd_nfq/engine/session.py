"""What the engine knows of one connection beyond TCP: its protocol's
machine, the envelope so far, and what the engine decided for the rest of it.

A flow's Session is made with the flow, at the client's SYN, so a settled
fate never passes on to a new connection on the same ports.
"""

from __future__ import annotations

import enum

from .imap import IMAPMachine
from .machine import Machine
from .pop3 import POP3Machine
from .refusal import Recognizer, Refusals
from .smtp import SMTPMachine


class Fate(enum.Enum):
    """What becomes of a connection's later packets."""

    INSPECTED = "inspected"  # each packet is judged
    REFUSED = "refused"      # both ends were reset: stragglers are dropped
    BYPASSED = "bypassed"    # nothing more to learn: the flow left the queue


class Session:
    __slots__ = ("protocol", "smtp", "machine", "fate", "sender", "authenticated", "user",
                 "hidden", "refusals", "mta")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol  # "smtp", "pop3" or "imap": also the source of its logins
        #: the SMTP machine, for what only SMTP has (recipients to refuse in place)
        self.smtp = SMTPMachine() if protocol == "smtp" else None
        self.machine: Machine = (
            self.smtp or (POP3Machine() if protocol == "pop3" else IMAPMachine()))
        self.fate = Fate.INSPECTED
        self.sender: str | None = None
        self.authenticated = False
        #: the SMTP AUTH login name, once the server accepted it
        self.user: str | None = None
        #: server-stream (offset, length) ranges overwritten to hide TLS (a
        #: tuple: the empty one is shared, and most sessions hide nothing)
        self.hidden: tuple[tuple[int, int], ...] = ()
        #: recipients refused in place (refusal.py), once there is one
        self.refusals: Refusals | None = None
        #: which MTA answers, told from its first lines (SMTP only)
        self.mta = Recognizer() if self.smtp is not None else None
