"""Packets sapd-nfq injects when it refuses a session, built with scapy.

Crafting happens only on a FAIL (a few per refused session), so scapy's
cost (~0.3 ms a packet) is irrelevant there; the per-packet path never
touches scapy.

Sequence numbers follow Suricata's reject logic: a packet towards the sender
of the offending segment takes that segment's ack as its seq; a packet
towards its receiver takes the segment's own seq.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import Packet

from .packet import ACK, FIN, SYN, Segment

_MASK = 0xFFFFFFFF


def _ip(version: int, src: str, dst: str) -> Packet:
    return IP(src=src, dst=dst) if version == 4 else IPv6(src=src, dst=dst)


def _seq_space(seg: Segment) -> int:
    """Sequence numbers the segment occupies (SYN and FIN count one each)."""
    return len(seg.payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN)


def reply_and_close(seg: Segment, text: bytes) -> bytes:
    """`text` to the sender of `seg`, as if from its peer, with FIN.

    The client reads the reply and then end of stream, so an RFC 5321 client
    records a permanent 5xx failure instead of a dropped connection (which it
    would treat as temporary and retry). The offending bytes are acknowledged
    so the client does not retransmit them.
    """
    ack = (seg.seq + _seq_space(seg)) & _MASK
    pkt = _ip(seg.version, seg.dst, seg.src) / TCP(
        sport=seg.dport, dport=seg.sport, seq=seg.ack, ack=ack, flags="FPA", window=0
    ) / text
    return bytes(pkt)


def reset_receiver(seg: Segment, seq: int | None = None) -> bytes:
    """RST to the receiver of `seg`, as if from its sender, at `seg`'s seq
    (or at `seq`)."""
    pkt = _ip(seg.version, seg.src, seg.dst) / TCP(
        sport=seg.sport, dport=seg.dport, seq=seg.seq if seq is None else seq, flags="R"
    )
    return bytes(pkt)


def probe_receiver(seg: Segment) -> bytes:
    """A bare ACK to the receiver of `seg`, as if from its sender, at `seg`'s seq.

    A receiver that already took bytes beyond that seq (their ACKs were lost)
    ignores a RST there (RFC 5961: out of window), but answers this with a
    duplicate ACK, whose ack is exactly where a RST to it lands.
    """
    pkt = _ip(seg.version, seg.src, seg.dst) / TCP(
        sport=seg.sport, dport=seg.dport, seq=seg.seq, ack=seg.ack, flags="A"
    )
    return bytes(pkt)


def reset_sender(seg: Segment) -> bytes:
    """RST to the sender of `seg`, as if from its peer, at `seg`'s ack."""
    if seg.flags & ACK:
        tcp = TCP(sport=seg.dport, dport=seg.sport, seq=seg.ack, flags="R")
    else:  # RFC 9293: answer a segment without ACK with RST+ACK at seq 0
        tcp = TCP(sport=seg.dport, dport=seg.sport, seq=0,
                  ack=(seg.seq + _seq_space(seg)) & _MASK, flags="RA")
    return bytes(_ip(seg.version, seg.dst, seg.src) / tcp)
