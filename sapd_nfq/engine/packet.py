"""IPv4/IPv6 + TCP header parsing for the per-packet path.

Every queued packet passes through `parse`, so it uses precompiled `struct`
formats and slices, never scapy (a scapy dissect costs ~180 us a packet,
this a few us). Anything that is not one whole, unfragmented TCP segment is
refused with MalformedPacket, so the layers above never reason about
fragments, foreign protocols or bytes we did not receive:

- IPv4 and IPv6 fragments are refused (conntrack reassembles before the
  queue, so a fragment here is unusual and cannot be inspected alone);
- IPv6 extension headers are walked (hop-by-hop first only, routing,
  destination options); a routing header with segments left is refused,
  because its IPv6 destination is not the final one (the flow key and the
  checksum pseudo-header would both be wrong);
- a packet shorter than its IP length says is `Truncated` (the queue copies
  at most 65531 bytes of a packet; a GRO super-packet or a segment of a
  larger MTU may be longer), and so is one whose length the IP header does
  not give (total length 0: a BIG TCP packet over 64 KB, or an IPv6
  jumbogram); bytes past the IP length (ethernet padding) are ignored.

Checksums are not checked here: conntrack has (the rules drop its INVALID),
and the TCP checksum of a GRO super-packet, or of one the sender's stack
left to the NIC, holds only the pseudo-header's sum. What the gate rewrites
leaves with both checksums computed over the whole packet (`_with_checksum`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address

from .errors import MalformedPacket

FIN, SYN, RST, PSH, ACK, URG = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20

_TCP = 6
_IPV6_HOP_BY_HOP, _IPV6_ROUTING, _IPV6_FRAGMENT, _IPV6_DEST_OPTS = 0, 43, 44, 60

# version/ihl, tos, total length, id, flags/fragment offset, ttl, protocol
_IPV4 = struct.Struct("!BBHHHBB")
# payload length, next header (after the 4-byte version/class/flow word)
_IPV6 = struct.Struct("!HB")
_IPV6_LENGTH = struct.Struct("!H")
# ports, seq, ack, data offset byte, flags, window
_TCP_HEADER = struct.Struct("!HHIIBBH")
_CHECKSUM = struct.Struct("!H")


class Truncated(MalformedPacket):
    """We hold fewer bytes than the packet had on the wire.

    `segment` has the headers when they arrived whole (its payload is the
    part that arrived), so that the packet can be given its protocol's safe
    verdict; it is never to be inspected, rewritten or counted as seen.
    """

    def __init__(self, message: str, segment: Segment | None = None) -> None:
        super().__init__(message)
        self.segment = segment


class Segment:
    """One TCP segment, as parsed. Treat as immutable.

    `src` and `dst` are addresses in canonical text form (ipaddress's), so
    they can key flows directly. `payload_offset` is the index of the
    payload's first byte in the packet and `tcp_offset` that of the TCP
    header. The repr shows the payload's length only: payloads carry logins.
    """

    __slots__ = ("version", "src", "dst", "sport", "dport", "seq", "ack", "flags",
                 "window", "payload", "payload_offset", "tcp_offset")

    def __init__(self, version: int, src: str, dst: str, sport: int, dport: int,
                 seq: int, ack: int, flags: int, window: int, payload: bytes,
                 payload_offset: int, tcp_offset: int) -> None:
        self.version = version
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.payload = payload
        self.payload_offset = payload_offset
        self.tcp_offset = tcp_offset

    def __repr__(self) -> str:
        flags = "".join(c for bit, c in zip((FIN, SYN, RST, PSH, ACK, URG), "FSRPAU")
                        if self.flags & bit)
        return (f"Segment(IPv{self.version} [{self.src}]:{self.sport} > [{self.dst}]:{self.dport}"
                f" {flags or '-'} seq={self.seq} ack={self.ack} win={self.window}"
                f" len={len(self.payload)})")


def parse(packet: bytes, wire_len: int | None = None) -> Segment:
    """The TCP segment in an IP packet, or MalformedPacket.

    `wire_len` is the packet's length on the wire when the capture layer
    reports it; more than we hold means Truncated.
    """
    have = len(packet)
    end, cut = _ip_end(packet, have)
    if wire_len is not None and wire_len > have:
        cut = f"captured {have} of {wire_len} bytes"
    try:
        seg = _segment(packet, end)
    except MalformedPacket as exc:
        if cut is None:
            raise
        raise Truncated(cut) from exc
    if cut is not None:
        raise Truncated(cut, seg)
    return seg


def _ip_end(packet: bytes, have: int) -> tuple[int, str | None]:
    """Where the IP packet ends in what we hold, and why it is cut there, if it is."""
    if not have:
        raise MalformedPacket("empty packet")
    version = packet[0] >> 4
    if version == 4:
        if have < 20:
            raise MalformedPacket(f"IPv4 header needs 20 bytes, have {have}")
        vihl, _, end = _IPV4.unpack_from(packet)[:3]
        off = (vihl & 0x0F) * 4
        if end == 0 and off >= 20:
            return have, "IPv4 total length 0 (BIG TCP, over 64 KB)"
        if off < 20 or end < off:
            raise MalformedPacket(f"IPv4 header length {off}, total length {end}")
        if end > have:
            return have, f"IPv4 total length {end}, captured {have}"
        return end, None
    if version == 6:
        if have < 40:
            raise MalformedPacket(f"IPv6 header needs 40 bytes, have {have}")
        (length,) = _IPV6_LENGTH.unpack_from(packet, 4)
        if length == 0 and have > 40:
            return have, "IPv6 payload length 0 (a jumbogram, over 64 KB)"
        if 40 + length > have:
            return have, f"IPv6 payload length {length}, captured {have - 40}"
        return 40 + length, None
    raise MalformedPacket(f"IP version {version}")


def _segment(packet: bytes, end: int) -> Segment:
    """The TCP segment in packet[:end] (its IP header already checked by _ip_end)."""
    version = packet[0] >> 4
    if version == 4:
        vihl, _, _, _, frag, _, proto = _IPV4.unpack_from(packet)
        off = (vihl & 0x0F) * 4
        if frag & 0x3FFF:
            raise MalformedPacket("IPv4 fragment")
        if proto != _TCP:
            raise MalformedPacket(f"IPv4 protocol {proto} is not TCP")
        src = _address_text(packet[12:16])
        dst = _address_text(packet[16:20])
    else:
        _, proto = _IPV6.unpack_from(packet, 4)
        off = 40
        while proto != _TCP:
            off, proto = _ipv6_extension(packet, off, end, proto)
        src = _address_text(packet[8:24])
        dst = _address_text(packet[24:40])

    if off + 20 > end:
        raise MalformedPacket("TCP header beyond the IP packet")
    sport, dport, seq, ack, doff, flags, window = _TCP_HEADER.unpack_from(packet, off)
    start = off + (doff >> 4) * 4
    if start < off + 20 or start > end:
        raise MalformedPacket(f"TCP data offset {doff >> 4} words")
    return Segment(version, src, dst, sport, dport, seq, ack, flags, window,
                   bytes(packet[start:end]), start, off)


@lru_cache(maxsize=4096)
def _address_text(raw: bytes) -> str:
    """4 or 16 address bytes as text; a gateway sees few distinct peers at a
    time, so the cache answers most packets (~0.2 against ~0.8 us)."""
    return str(IPv4Address(raw) if len(raw) == 4 else IPv6Address(raw))


def _ipv6_extension(packet: bytes, off: int, end: int, kind: int) -> tuple[int, int]:
    """Skip the extension header at `off`: (next offset, next header)."""
    if kind == _IPV6_FRAGMENT:
        raise MalformedPacket("IPv6 fragment")
    if kind not in (_IPV6_HOP_BY_HOP, _IPV6_ROUTING, _IPV6_DEST_OPTS):
        raise MalformedPacket(f"IPv6 next header {kind} is not TCP")
    if kind == _IPV6_HOP_BY_HOP and off != 40:
        raise MalformedPacket("IPv6 hop-by-hop options not first")
    if off + 8 > end:
        raise MalformedPacket("IPv6 extension header beyond the packet")
    if kind == _IPV6_ROUTING and packet[off + 3]:
        raise MalformedPacket("IPv6 routing header with segments left")
    nxt = off + (packet[off + 1] + 1) * 8
    if nxt > end:
        raise MalformedPacket("IPv6 extension header beyond the packet")
    return nxt, packet[off]


def _checksum_residue(packet: bytes | bytearray, seg: Segment) -> int:
    """The TCP segment with its pseudo-header, summed modulo 0xFFFF.

    The ones' complement sum of 16-bit words is their big-endian
    concatenation modulo 0xFFFF (2**16 = 1 mod 0xFFFF), which lets
    int.from_bytes do the summing in C.
    """
    end = seg.payload_offset + len(seg.payload)
    length = end - seg.tcp_offset
    if seg.version == 4:
        pseudo = bytes(packet[12:20]) + b"\0\x06" + length.to_bytes(2, "big")
    else:
        pseudo = bytes(packet[8:40]) + length.to_bytes(4, "big") + b"\0\0\0\x06"
    data = pseudo + bytes(packet[seg.tcp_offset:end])
    if length % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def tcp_checksum_ok(packet: bytes, seg: Segment | None = None) -> bool:
    """Whether the TCP checksum is right (raises MalformedPacket if unparsable).

    Pass `seg` when the packet is already parsed.
    """
    if seg is None:
        seg = parse(packet)
    return _checksum_residue(packet, seg) == 0


def with_payload_bytes(packet: bytes, seg: Segment, start: int, data: bytes) -> bytes:
    """`packet` with payload[start:start + len(data)] replaced by `data`.

    The lengths stay the same, so only the TCP checksum is recomputed.
    """
    if start < 0 or start + len(data) > len(seg.payload):
        raise ValueError(f"bytes {start}..{start + len(data)} outside a "
                         f"{len(seg.payload)}-byte payload")
    out = bytearray(packet)
    at = seg.payload_offset + start
    out[at:at + len(data)] = data
    return _with_checksum(out, seg)


def without_urgent(packet: bytes, seg: Segment) -> bytes:
    """`packet` with the URG flag and the urgent pointer cleared.

    The receiver then reads the urgent byte in line with the rest, as the
    stream inspected it (docs/security.md, "Urgent data"). Only the checksum changes
    besides.
    """
    out = bytearray(packet)
    out[seg.tcp_offset + 13] &= ~URG & 0xFF
    out[seg.tcp_offset + 18:seg.tcp_offset + 20] = b"\0\0"
    return _with_checksum(out, seg)


def _with_checksum(out: bytearray, seg: Segment) -> bytes:
    """`out` (the packet `seg` was parsed from, edited in place without
    changing a length) with full checksums: TCP over the whole segment, and
    the IPv4 header's.

    The kernel takes a packet given back with a verdict as checksummed
    (CHECKSUM_NONE), a super-packet too, whose segments it later cuts from
    it in software: the fields must hold the full sums, not the partial one
    a GRO or TSO packet carries.
    """
    field = seg.tcp_offset + 16
    out[field:field + 2] = b"\0\0"
    _CHECKSUM.pack_into(out, field, -_checksum_residue(out, seg) % 0xFFFF)
    if seg.version == 4:
        out[10:12] = b"\0\0"
        header = bytes(out[:seg.tcp_offset])
        _CHECKSUM.pack_into(out, 10, -int.from_bytes(header, "big") % 0xFFFF)
    return bytes(out)


def with_stream_bytes(packet: bytes, seg: Segment, seg_offset: int,
                      ranges: Iterable[tuple[int, bytes]]) -> bytes | None:
    """`packet`, whose payload starts at stream offset `seg_offset`, with
    each (stream offset, bytes) range laid over it where they meet; None if
    none does."""
    end = seg_offset + len(seg.payload)
    changed = packet
    for offset, data in ranges:
        lo, hi = max(offset, seg_offset), min(offset + len(data), end)
        if lo < hi:
            changed = with_payload_bytes(changed, seg, lo - seg_offset,
                                         data[lo - offset:hi - offset])
    return changed if changed is not packet else None
