"""What a daemon remembers of each client, for `sapd-nfq why`.

The last decisions about a client (time, sender, recipient, row, reason)
and the last logins learned for it, in bounded memory: a few entries a
client, for the clients seen most recently. The login store says whether a
window is open now; this says what happened, including a login that has
lapsed since (the store forgets those).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from ..engine.addresses import normalize_ip
from ..engine.verdicts import Notice

DECISIONS_KEPT = 20  # a client
LOGINS_KEPT = 5  # a client
CLIENTS_KEPT = 4096


class _Client:
    """The notices as they came (a decision costs the packet path an append;
    `about` shapes them)."""

    __slots__ = ("decisions", "logins")

    def __init__(self) -> None:
        self.decisions: deque[Notice] = deque(maxlen=DECISIONS_KEPT)
        self.logins: deque[tuple[Notice, float]] = deque(maxlen=LOGINS_KEPT)  # with its expiry


class Recent:
    def __init__(self, clients: int = CLIENTS_KEPT) -> None:
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._max = clients

    def _client(self, address: str) -> _Client:
        # The engine's addresses are mostly in normal form already: parsed
        # only when the text itself is not a key.
        key = address
        entry = self._clients.get(key)
        if entry is None:
            key = normalize_ip(address)
            entry = self._clients.get(key)
        if entry is None:
            entry = self._clients[key] = _Client()
            if len(self._clients) > self._max:
                self._clients.popitem(last=False)
        else:
            self._clients.move_to_end(key)
        return entry

    def note(self, notice: Notice, auth_ttl: float) -> None:
        """Remember a decision or a login; other notices are not kept."""
        if notice.event in ("pass", "fail", "would-fail"):
            self._client(notice.client).decisions.append(notice)
        elif notice.event == "login" and notice.source != "smtp-auth":
            # an SMTP AUTH login opens no window for the address
            self._client(notice.client).logins.append((notice, notice.time + auth_ttl))

    def about(self, address: str) -> dict[str, list[dict[str, Any]]]:
        entry = self._clients.get(normalize_ip(address))
        if entry is None:
            return {"decisions": [], "logins": []}
        return {"decisions": [{"time": n.time, "verdict": n.event.upper(), "sender": n.sender,
                               "recipient": n.recipient, "row": n.row, "reason": n.reason}
                              for n in entry.decisions],
                "logins": [{"time": n.time, "user": n.user, "source": n.source, "expires": expires}
                           for n, expires in entry.logins]}

    def __len__(self) -> int:
        return len(self._clients)
