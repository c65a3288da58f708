"""Reading classic pcap files (what tcpdump -w writes), for `replay`.

Yields (timestamp, IP packet bytes, original length). Only the link layers
tcpdump produces on Linux are understood; anything else is a clear error.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from ..engine.errors import SapdError

_ETHERNET, _RAW, _SLL, _SLL2, _IPV4, _IPV6 = 1, 101, 113, 276, 228, 229
_ETH_IP = {0x0800, 0x86DD}


class PcapError(SapdError):
    pass


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    """Where the IP header starts in a frame, or None if it carries no IP."""
    if linktype in (_RAW, _IPV4, _IPV6):
        return 0
    if linktype == _ETHERNET:
        offset, ethertype = 14, int.from_bytes(frame[12:14], "big")
        while ethertype in (0x8100, 0x88A8):  # VLAN tags
            ethertype = int.from_bytes(frame[offset + 2:offset + 4], "big")
            offset += 4
        return offset if ethertype in _ETH_IP else None
    if linktype == _SLL:
        return 16 if int.from_bytes(frame[14:16], "big") in _ETH_IP else None
    if linktype == _SLL2:
        return 20 if int.from_bytes(frame[0:2], "big") in _ETH_IP else None
    raise PcapError(f"unsupported link type {linktype}")


def read_packets(stream: BinaryIO) -> Iterator[tuple[float, bytes, int]]:
    header = stream.read(24)
    if len(header) < 24:
        raise PcapError("not a pcap file (too short)")
    magic = header[:4]
    formats = {
        b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
        b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9),
    }
    if magic not in formats:
        raise PcapError("not a classic pcap file (pcapng is not supported; "
                        "write with tcpdump -w, or convert with editcap -F pcap)")
    endian, unit = formats[magic]
    linktype = struct.unpack(endian + "I", header[20:24])[0] & 0x0FFFFFFF
    record = struct.Struct(endian + "IIII")
    while True:
        head = stream.read(16)
        if not head:
            return
        if len(head) < 16:
            raise PcapError("pcap file ends inside a record header")
        sec, frac, caplen, origlen = record.unpack(head)
        frame = stream.read(caplen)
        if len(frame) < caplen:
            raise PcapError("pcap file ends inside a packet")
        offset = _ip_offset(linktype, frame)
        if offset is None:
            continue
        yield sec + frac * unit, frame[offset:], origlen - offset
