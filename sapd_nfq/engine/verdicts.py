"""What the engine returns for each packet: a verdict, packets to inject,
and notices (the things an administrator reads in the log or in `replay`).

A Decision is a value, built once when the engine is done with a packet; the
common ones (accept, drop, bypass with nothing else to do) are shared.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class Verdict(enum.Enum):
    """What happens to the packet in the kernel (NFQUEUE's verdict)."""

    ACCEPT = "accept"
    DROP = "drop"
    #: accept, and take the rest of the flow out of the queue (connmark)
    BYPASS = "bypass"


@dataclass(frozen=True, slots=True)
class Notice:
    """One loggable fact. `event` is one of: login, login-failed, pass,
    fail, tls, reset, error. Never carries a password."""

    event: str
    client: str
    server: str = ""
    user: str | None = None
    sender: str | None = None
    recipient: str | None = None
    row: str | None = None
    reason: str | None = None
    time: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None and v != ""}

    def __str__(self) -> str:
        parts = [self.event.upper(), f"client={self.client}"]
        for name in ("user", "sender", "recipient", "row", "reason"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={value!r}" if name in ("sender", "recipient") else f"{name}={value}")
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


ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP
BYPASS = Verdict.BYPASS

ACCEPTED = Decision(ACCEPT)
DROPPED = Decision(DROP)
BYPASSED = Decision(BYPASS)
