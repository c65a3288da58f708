"""Reading the login name out of a SASL exchange (SMTP AUTH, POP3 AUTH).

Only the name is kept. Passwords, digests and tokens are decoded where the
name shares a message with them and then dropped on the spot: nothing here
stores, returns or formats them.
"""

from __future__ import annotations

import base64
import binascii


def _b64(data: bytes) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def login_name(raw: bytes) -> str | None:
    """A login name as text (undecodable bytes replaced), or None if empty."""
    name = raw.decode("utf-8", "replace").strip()
    return name or None


class SaslLogin:
    """One AUTH exchange seen from the wire.

    Feed the client's initial response (if any) and each client line sent in
    answer to a server continuation; `user` is the login name once known.
    """

    __slots__ = ("mechanism", "user", "_responses")

    def __init__(self, mechanism: str, initial: bytes | None = None) -> None:
        self.mechanism = mechanism.upper()
        self.user: str | None = None
        self._responses = 0
        if initial is not None and initial != b"=":
            self.client_response(initial)

    @property
    def method(self) -> str:
        return f"AUTH {self.mechanism}"

    def client_response(self, line: bytes) -> None:
        self._responses += 1
        if self.user is not None:
            return
        raw = _b64(line.strip())
        if raw is None:
            return
        mech = self.mechanism
        if mech == "PLAIN":
            parts = raw.split(b"\0")
            if len(parts) == 3:
                self.user = login_name(parts[1]) or login_name(parts[0])
        elif mech == "LOGIN":
            if self._responses == 1:
                self.user = login_name(raw)
        elif mech == "CRAM-MD5":
            self.user = login_name(raw.rsplit(b" ", 1)[0]) if b" " in raw else None
        elif mech.startswith("SCRAM-"):
            for attr in raw.split(b","):
                if attr.startswith(b"n="):
                    self.user = login_name(attr[2:].replace(b"=2C", b",").replace(b"=3D", b"="))
                    break

    def __repr__(self) -> str:
        return f"SaslLogin({self.mechanism!r}, user={self.user!r})"
