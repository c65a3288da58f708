"""Packets sapd-nfq injects when it refuses a session, packed with `struct`.

A spam bot probing for an open relay is the most common traffic an MX sees,
so a refusal must cost no more than a pass: each packet is a fixed header
template filled in and checksummed (a few microseconds), and the daemon never
imports a packet library. The headers are what a Linux stack sends: IPv4 with
DF, TTL and hop limit 64, a 20-octet TCP header without options.

Sequence numbers follow Suricata's reject logic: a packet towards the sender
of the offending segment takes that segment's ack as its seq; a packet
towards its receiver takes the segment's own seq.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from ipaddress import ip_address

from .packet import ACK, FIN, PSH, RST, SYN, Segment

_MASK = 0xFFFFFFFF
TTL = 64
WINDOW = 8192  # what a reset or probe advertises; the reply advertises 0
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_DF = 0x4000
_TCP_HEADER = 5 << 4  # data offset: 20 octets, no options


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@lru_cache(maxsize=4096)
def _packed(address: str) -> bytes:
    return ip_address(address).packed


def _packet(version: int, src: str, dst: str, sport: int, dport: int, seq: int, ack: int,
            flags: int, window: int = WINDOW, payload: bytes = b"") -> bytes:
    """An IP packet with a TCP segment from src:sport to dst:dport."""
    saddr, daddr = _packed(src), _packed(dst)
    length = _TCP.size + len(payload)
    tcp = _TCP.pack(sport, dport, seq & _MASK, ack & _MASK, _TCP_HEADER, flags, window, 0, 0)
    pseudo = (saddr + daddr + struct.pack("!HH", 6, length) if version == 4
              else saddr + daddr + struct.pack("!IxxxB", length, 6))
    check = _checksum(pseudo + tcp + payload)
    tcp = tcp[:16] + struct.pack("!H", check) + tcp[18:]
    if version == 4:
        header = _IPV4.pack(0x45, 0, _IPV4.size + length, 0, _DF, TTL, 6, 0, saddr, daddr)
        header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    else:
        header = _IPV6.pack(6 << 28, length, 6, TTL, saddr, daddr)
    return header + tcp + payload


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
    return _packet(seg.version, seg.dst, seg.src, seg.dport, seg.sport, seg.ack,
                   seg.seq + _seq_space(seg), FIN | PSH | ACK, window=0, payload=text)


def reset_receiver(seg: Segment, seq: int | None = None) -> bytes:
    """RST to the receiver of `seg`, as if from its sender, at `seg`'s seq
    (or at `seq`)."""
    return _packet(seg.version, seg.src, seg.dst, seg.sport, seg.dport,
                   seg.seq if seq is None else seq, 0, RST)


def probe_receiver(seg: Segment) -> bytes:
    """A bare ACK to the receiver of `seg`, as if from its sender, at `seg`'s seq.

    A receiver that already took bytes beyond that seq (their ACKs were lost)
    ignores a RST there (RFC 5961: out of window), but answers this with a
    duplicate ACK, whose ack is exactly where a RST to it lands.
    """
    return _packet(seg.version, seg.src, seg.dst, seg.sport, seg.dport, seg.seq, seg.ack, ACK)


def duplicate_to_receiver(seg: Segment, seq: int, data: bytes) -> bytes:
    """`data`, bytes the receiver of `seg` was sent before, again at `seq`.

    A receiver answers a duplicate at once with an ACK carrying a D-SACK
    block (RFC 2883; SACK is on by default in Linux and Windows): an ACK
    with options, which the rules never let by the queue, so the daemon
    learns how far the receiver got. Were the first copy lost, the receiver
    takes the same bytes again.
    """
    return _packet(seg.version, seg.src, seg.dst, seg.sport, seg.dport, seq, seg.ack, ACK,
                   payload=data)


def reset_sender(seg: Segment) -> bytes:
    """RST to the sender of `seg`, as if from its peer, at `seg`'s ack."""
    if seg.flags & ACK:
        return _packet(seg.version, seg.dst, seg.src, seg.dport, seg.sport, seg.ack, 0, RST)
    # RFC 9293: answer a segment without ACK with RST+ACK at seq 0
    return _packet(seg.version, seg.dst, seg.src, seg.dport, seg.sport, 0,
                   seg.seq + _seq_space(seg), RST | ACK)
