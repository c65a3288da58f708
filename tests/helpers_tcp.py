"""Packets and segments for the TCP-layer tests.

`v4`/`v6` build real packet bytes with scapy; `segment` builds a Segment
directly, for stream and flow tests that need thousands of them quickly.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from sapd_nfq.engine.packet import Segment

CLIENT4, SERVER4 = "198.18.0.1", "198.18.0.2"
CLIENT6, SERVER6 = "2001:db8::1", "2001:db8::2"


def v4(payload: bytes = b"", flags: str = "PA", seq: int = 1000, ack: int = 2000,
       sport: int = 40000, dport: int = 25, ip: dict | None = None,
       tcp: dict | None = None) -> bytes:
    return bytes(IP(src=CLIENT4, dst=SERVER4, **(ip or {}))
                 / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, **(tcp or {}))
                 / payload)


def v6(payload: bytes = b"", flags: str = "PA", seq: int = 1000, ack: int = 2000,
       sport: int = 40000, dport: int = 25, ext: tuple = (),
       tcp: dict | None = None) -> bytes:
    pkt = IPv6(src=CLIENT6, dst=SERVER6)
    for header in ext:
        pkt = pkt / header
    return bytes(pkt / TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                           **(tcp or {})) / payload)


def segment(flags: int, seq: int = 0, ack: int = 0, payload: bytes = b"",
            from_client: bool = True) -> Segment:
    src, dst, sport, dport = CLIENT4, SERVER4, 40000, 25
    if not from_client:
        src, dst, sport, dport = dst, src, dport, sport
    return Segment(4, src, dst, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                   flags, 65535, payload, 40, 20)
