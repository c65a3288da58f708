from __future__ import annotations

import struct

import pytest
from helpers_tcp import CLIENT4, CLIENT6, SERVER4, SERVER6, v4, v6
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, IPOption_NOP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)

from sapd_nfq.engine.errors import MalformedPacket
from sapd_nfq.engine.packet import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    Truncated,
    parse,
    tcp_checksum_ok,
    with_payload_bytes,
    without_urgent,
)

TCP_OPTIONS = {"options": [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 2)),
                           ("NOP", None), ("WScale", 7)]}


def assert_matches_scapy(packet: bytes) -> None:
    seg = parse(packet)
    layer = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    tcp = layer[TCP]
    assert (seg.src, seg.dst) == (layer.src, layer.dst)
    assert (seg.sport, seg.dport, seg.seq, seg.ack) == (tcp.sport, tcp.dport, tcp.seq, tcp.ack)
    assert (seg.flags, seg.window) == (int(tcp.flags), tcp.window)
    assert seg.payload == bytes(tcp.payload)
    assert packet[seg.payload_offset:seg.payload_offset + len(seg.payload)] == seg.payload
    assert seg.tcp_offset == len(packet) - len(bytes(tcp))


# --- well-formed packets ----------------------------------------------------

@pytest.mark.parametrize("packet", [
    v4(b"EHLO client.example\r\n"),
    v4(b"", flags="S", seq=0xFFFFFFFF, ack=0, tcp=TCP_OPTIONS),
    v4(b"x", flags="FPAU", ip={"options": [IPOption_NOP()] * 4}),
    v4(b"QUIT\r\n", sport=25, dport=65535),
    v6(b"USER alice\r\n", dport=110),
    v6(b"", flags="SA", tcp=TCP_OPTIONS),
    v6(b"data", ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())),
    v6(b"data", ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrRouting(addresses=[SERVER6], segleft=0),
                     IPv6ExtHdrDestOpt())),
], ids=["v4-data", "v4-syn-options", "v4-ip-options", "v4-ports", "v6-data", "v6-synack",
        "v6-hbh-destopt", "v6-routing-done"])
def test_parse_agrees_with_scapy(packet: bytes) -> None:
    assert_matches_scapy(packet)


def test_fields_and_flags() -> None:
    seg = parse(v4(b"RCPT TO:<a@b>\r\n", flags="PA", seq=7, ack=9))
    assert (seg.version, seg.src, seg.dst) == (4, CLIENT4, SERVER4)
    assert seg.flags == PSH | ACK and not seg.flags & (FIN | SYN | RST | URG)
    assert (seg.payload_offset, seg.tcp_offset) == (40, 20)
    seg6 = parse(v6())
    assert (seg6.version, seg6.src, seg6.dst) == (6, CLIENT6, SERVER6)


def test_ipv6_addresses_in_canonical_text() -> None:
    packet = bytes(IPv6(src="2001:0db8:0000:0000:0000:0000:0000:0001",
                        dst="2001:DB8:0:0:1:0:0:1") / TCP())
    seg = parse(packet)
    assert (seg.src, seg.dst) == ("2001:db8::1", "2001:db8::1:0:0:1")


def test_ethernet_padding_is_ignored() -> None:
    packet = v4(flags="A")  # 40 bytes; ethernet pads frames to 46 bytes of IP
    seg = parse(packet + b"\0" * 6)
    assert seg.payload == b""
    assert tcp_checksum_ok(packet + b"\0" * 6)


def test_repr_hides_the_payload() -> None:
    text = repr(parse(v4(b"PASS hunter2\r\n", dport=110)))
    assert "hunter2" not in text and "len=14" in text


# --- malformed and truncated ------------------------------------------------

def _set(packet: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(packet)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


V4 = v4(b"hello")          # IP header 20, TCP 20, payload 5: total 45
V6 = v6(b"hello")          # IPv6 40, TCP 20, payload 5

MALFORMED = {
    "empty": b"",
    "version-5": b"\x50" + V4[1:],
    "v4-short-header": V4[:19],
    "v4-ihl-4": _set(V4, 0, "!B", 0x44),
    "v4-total-below-header": _set(V4, 2, "!H", 19),
    "v4-ihl-beyond-total": _set(V4, 0, "!B", 0x4F),
    "v4-more-fragments": _set(V4, 6, "!H", 0x2000),
    "v4-fragment-offset": _set(V4, 6, "!H", 0x0001),
    "v4-udp": bytes(IP(src=CLIENT4, dst=SERVER4) / UDP() / b"x"),
    "v4-tcp-header-short": _set(V4, 2, "!H", 39)[:39],
    "v4-data-offset-4": _set(V4, 32, "!B", 0x40),
    "v4-data-offset-beyond": _set(V4, 32, "!B", 0xF0),
    "v6-short-header": V6[:39],
    "v6-fragment": v6(b"x", ext=(IPv6ExtHdrFragment(),)),
    "v6-udp": bytes(IPv6(src=CLIENT6, dst=SERVER6) / UDP() / b"x"),
    "v6-no-next-header": _set(V6, 6, "!B", 59),
    "v6-hbh-not-first": v6(b"x", ext=(IPv6ExtHdrDestOpt(), IPv6ExtHdrHopByHop())),
    "v6-routing-in-transit": v6(b"x", ext=(IPv6ExtHdrRouting(addresses=[SERVER6], segleft=1),)),
    "v6-ext-beyond-packet": _set(v6(b"", ext=(IPv6ExtHdrDestOpt(),)), 41, "!B", 9),
    "v6-ext-header-cut": _set(_set(V6, 6, "!B", 60), 4, "!H", 4)[:44],
}


@pytest.mark.parametrize("packet", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed(packet: bytes) -> None:
    with pytest.raises(MalformedPacket) as info:
        parse(packet)
    assert not isinstance(info.value, Truncated)


# (packet, wire_len, whether the TCP header arrived)
TRUNCATED = {
    "v4-total-length": (V4[:44], None, True),
    "v4-header-cut": (V4[:30], None, False),
    "v6-payload-length": (V6[:64], None, True),
    "wire-len": (V4, len(V4) + 1, True),
    "netfilterqueue-cut": (v4(b"x" * 5000)[:4096], None, True),
    # a 65535-byte packet (MTU 65535) and the queue's copy range of 65531
    "copy-range-cut": (v4(b"x" * 65495)[:65531], None, True),
    "v6-copy-range-cut": (v6(b"x" * 65475)[:65531], None, True),
    # the length fields cannot say more than 64 KB: BIG TCP leaves them 0
    "v4-big-tcp": (_set(V4, 2, "!H", 0), None, True),
    "v6-big-tcp": (_set(V6, 4, "!H", 0), None, True),
    "v4-big-tcp-fragment": (_set(_set(V4, 2, "!H", 0), 6, "!H", 0x2000), None, False),
}


@pytest.mark.parametrize("packet, wire_len, headers", TRUNCATED.values(), ids=TRUNCATED.keys())
def test_truncated(packet: bytes, wire_len: int | None, headers: bool) -> None:
    with pytest.raises(Truncated) as info:
        parse(packet, wire_len)
    seg = info.value.segment
    assert (seg is not None) == headers
    if seg is not None:  # the headers, for the safe verdict; the payload only as far as it came
        assert (seg.sport, seg.dport, seg.seq) == (40000, 25, 1000)
        assert packet[seg.payload_offset:] == seg.payload


def test_wire_len_equal_or_smaller_is_whole() -> None:
    assert parse(V4, len(V4)).payload == b"hello"
    assert parse(V4 + b"\0" * 6, len(V4) + 6).payload == b"hello"


# --- checksums ----------------------------------------------------------------

@pytest.mark.parametrize("packet", [
    v4(b"even"), v4(b"odd"), v4(b""), v4(b"\xff" * 1400, tcp=TCP_OPTIONS),
    v6(b"even"), v6(b"odd"), v6(b"x", ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())),
], ids=["v4-even", "v4-odd", "v4-empty", "v4-big", "v6-even", "v6-odd", "v6-ext"])
def test_checksum_ok_and_corrupted(packet: bytes) -> None:
    seg = parse(packet)
    assert tcp_checksum_ok(packet) and tcp_checksum_ok(packet, seg)
    for at in (seg.tcp_offset + 4, len(packet) - 1, 12 if seg.version == 4 else 8):
        bad = bytearray(packet)
        bad[at] ^= 0x01
        assert not tcp_checksum_ok(bytes(bad))


def _scapy_checksum(packet: bytes) -> tuple[int, int]:
    """(checksum in the packet, checksum scapy computes for it)."""
    layer = IP(packet) if packet[0] >> 4 == 4 else IPv6(packet)
    stated = layer[TCP].chksum
    del layer[TCP].chksum
    fresh = IP(bytes(layer)) if packet[0] >> 4 == 4 else IPv6(bytes(layer))
    return stated, fresh[TCP].chksum


@pytest.mark.parametrize("build", [v4, v6], ids=["v4", "v6"])
def test_with_payload_bytes_hides_starttls(build) -> None:
    packet = build(b"250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n", sport=25, dport=40000)
    seg = parse(packet)
    at = seg.payload.index(b"STARTTLS")
    out = with_payload_bytes(packet, seg, at, b"XXXXXXXX")
    assert parse(out).payload == b"250-PIPELINING\r\n250-XXXXXXXX\r\n250 8BITMIME\r\n"
    assert len(out) == len(packet) and out[:seg.tcp_offset] == packet[:seg.tcp_offset]
    assert tcp_checksum_ok(out)
    stated, fresh = _scapy_checksum(out)
    assert stated == fresh


@pytest.mark.parametrize("start, data", [(0, b"Z"), (4, b"ZZ"), (5, b"abc"), (0, b"12345")])
def test_with_payload_bytes_every_alignment(start: int, data: bytes) -> None:
    packet = v4(b"abcdefgh" if start + len(data) <= 8 else b"abcde")
    seg = parse(packet)
    out = with_payload_bytes(packet, seg, start, data)
    assert parse(out).payload[start:start + len(data)] == data
    assert tcp_checksum_ok(out)
    assert _scapy_checksum(out)[0] == _scapy_checksum(out)[1]


@pytest.mark.parametrize("packet", [
    v4(b"XRCPT TO:<a@b>\r\n", flags="PAU", tcp={"urgptr": 1}),
    v4(b"", flags="AU", tcp={"urgptr": 4000, **TCP_OPTIONS}),  # aims at later data
    v4(b"odd", flags="FPAU", tcp={"urgptr": 2}, ip={"options": [IPOption_NOP()] * 4}),
    v6(b"XUSER alice\r\n", flags="PAU", dport=110, tcp={"urgptr": 1},
       ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())),
], ids=["v4", "v4-pointer-ahead", "v4-ip-options", "v6-ext"])
def test_without_urgent_clears_flag_and_pointer_only(packet: bytes) -> None:
    seg = parse(packet)
    out = without_urgent(packet, seg)
    tcp = (IP(out) if seg.version == 4 else IPv6(out))[TCP]
    assert tcp.urgptr == 0 and int(tcp.flags) == seg.flags & ~URG
    after = parse(out)
    assert (after.seq, after.ack, after.window, after.payload) == (seg.seq, seg.ack, seg.window,
                                                                   seg.payload)
    assert len(out) == len(packet) and out[:seg.tcp_offset] == packet[:seg.tcp_offset]
    assert tcp_checksum_ok(out) and _scapy_checksum(out)[0] == _scapy_checksum(out)[1]


def _as_gro_leaves_it(packet: bytes) -> bytes:
    """`packet` with the checksums a GRO super-packet carries into the queue:
    the TCP field holds only the pseudo-header's sum (left for hardware),
    and here the IPv4 header's is stale too."""
    seg = parse(packet)
    out = bytearray(packet)
    length = len(packet) - seg.tcp_offset
    pseudo = (packet[12:20] + b"\0\x06" + length.to_bytes(2, "big") if seg.version == 4
              else packet[8:40] + length.to_bytes(4, "big") + b"\0\0\0\x06")
    struct.pack_into("!H", out, seg.tcp_offset + 16, int.from_bytes(pseudo, "big") % 0xFFFF)
    if seg.version == 4:
        struct.pack_into("!H", out, 10, 0x1234)
    return bytes(out)


@pytest.mark.parametrize("build", [v4, v6], ids=["v4", "v6"])
def test_a_rewritten_super_packet_leaves_with_full_checksums(build) -> None:
    body = b"250-SIZE 100\r\n" * 4600 + b"250-STARTTLS\r\n250 8BITMIME\r\n"
    packet = _as_gro_leaves_it(build(body, sport=25, dport=40000, tcp=TCP_OPTIONS))
    assert len(packet) > 64000 and not tcp_checksum_ok(packet)
    seg = parse(packet)
    out = with_payload_bytes(packet, seg, seg.payload.index(b"STARTTLS"), b"XXXXXXXX")
    assert len(out) == len(packet) and b"250-XXXXXXXX" in out
    assert tcp_checksum_ok(out)
    stated, fresh = _scapy_checksum(out)
    assert stated == fresh
    if seg.version == 4:
        header = IP(out)
        stated_ip = header.chksum
        del header.chksum
        assert stated_ip == IP(bytes(header)).chksum


@pytest.mark.parametrize("start, data", [(-1, b"x"), (4, b"xx"), (6, b"")])
def test_with_payload_bytes_outside_the_payload(start: int, data: bytes) -> None:
    seg = parse(V4)
    with pytest.raises(ValueError):
        with_payload_bytes(V4, seg, start, data)


# --- fuzzing: parse, or raise MalformedPacket, never anything else ----------

def _parse_or_malformed(packet: bytes, wire_len: int | None = None) -> None:
    try:
        seg = parse(packet, wire_len)
    except MalformedPacket:
        return
    assert 0 <= seg.tcp_offset < seg.payload_offset <= len(packet)
    tcp_checksum_ok(packet, seg)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.none() | st.integers(0, 200))
def test_fuzz_arbitrary_bytes(packet: bytes, wire_len: int | None) -> None:
    _parse_or_malformed(packet, wire_len)


BASES = [V4, V6, v6(b"x", ext=(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())),
         v4(b"y", tcp=TCP_OPTIONS, ip={"options": [IPOption_NOP()] * 4})]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BASES), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=4), st.integers(0, 200))
def test_fuzz_mutated_packets(base: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    packet = bytearray(base)
    for at, value in edits:
        if at < len(packet):
            packet[at] = value
    _parse_or_malformed(bytes(packet[:cut]))
    _parse_or_malformed(bytes(packet))
