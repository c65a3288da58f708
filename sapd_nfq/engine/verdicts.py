"""What the engine returns for each packet: a verdict, packets to inject,
and notices (the things an administrator reads in the log or in `replay`).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field


class Verdict(enum.Enum):
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


@dataclass(slots=True)
class Decision:
    verdict: Verdict
    #: the packet to pass instead of the original (a hidden TLS keyword)
    packet: bytes | None = None
    #: raw IP packets to send (a refusal to the client, resets)
    inject: list[bytes] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)


ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP
BYPASS = Verdict.BYPASS
