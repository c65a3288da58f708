"""The exceptions sapd-nfq raises, one per kind of fault.

`ProtocolError` is the only exception a protocol machine may raise while
parsing peer bytes: whatever a hostile peer sends, a machine either parses it
or raises this, never anything else.
"""


class SapdError(Exception):
    """Base of every error sapd-nfq raises on purpose."""


class ProtocolError(SapdError):
    """A peer broke the protocol (or tried to smuggle something past us).

    `hint` is a short text fit for a log line and for the reason of a Fail
    verdict. It never contains credentials.
    """

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint


class MalformedPacket(SapdError):
    """Packet bytes that are not a well-formed IPv4/IPv6 TCP packet."""


class ConfigError(SapdError):
    """A bad configuration file or value; the message names the key."""


class MapError(SapdError):
    """A virtusertable that cannot be read; the message names file and line."""
