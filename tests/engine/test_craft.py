"""The injected packets, packed with struct, read back by scapy: every field and checksum."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from sapd_nfq.engine import craft
from sapd_nfq.engine.packet import ACK, FIN, PSH, RST, SYN, Segment, parse

ADDRESSES = {4: ("198.18.1.2", "198.18.2.2"), 6: ("2001:db8:1::2", "2001:db8:2::2")}
u32 = st.integers(0, 0xFFFFFFFF)
port = st.integers(1, 65535)


@st.composite
def segments(draw) -> Segment:
    version = draw(st.sampled_from((4, 6)))
    src, dst = ADDRESSES[version]
    flags = draw(st.sampled_from((ACK, ACK | PSH, ACK | FIN, SYN, ACK | SYN, 0)))
    payload = draw(st.binary(max_size=64))
    return Segment(version, src, dst, draw(port), draw(port), draw(u32), draw(u32), flags,
                   65535, payload, 0, 20)


def read(packet: bytes, version: int):
    """The packet as scapy reads it, after checking both checksums against scapy's own."""
    pkt = IP(packet) if version == 4 else IPv6(packet)
    rebuilt = pkt.copy()
    del rebuilt[TCP].chksum
    if version == 4:
        del rebuilt[IP].chksum
    assert bytes(rebuilt.__class__(bytes(rebuilt))) == packet
    if version == 4:
        assert (pkt.ihl, pkt.flags, pkt.frag, pkt.ttl, pkt.proto, pkt.len) == (
            5, "DF", 0, craft.TTL, 6, len(packet))
    else:
        assert (pkt.nh, pkt.hlim, pkt.plen) == (6, craft.TTL, len(packet) - 40)
    assert pkt[TCP].dataofs == 5 and pkt[TCP].urgptr == 0
    return pkt


def space(seg: Segment) -> int:
    return len(seg.payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN)


@given(segments(), st.binary(min_size=1, max_size=200))
def test_the_reply_goes_to_the_sender_as_from_its_peer_with_fin(seg, text):
    pkt = read(craft.reply_and_close(seg, text), seg.version)
    tcp = pkt[TCP]
    assert (pkt.src, pkt.dst, tcp.sport, tcp.dport) == (seg.dst, seg.src, seg.dport, seg.sport)
    assert (tcp.seq, tcp.ack) == (seg.ack, (seg.seq + space(seg)) & 0xFFFFFFFF)
    assert (int(tcp.flags), tcp.window, bytes(tcp.payload)) == (FIN | PSH | ACK, 0, text)


@given(segments(), st.none() | u32)
def test_the_receiver_reset_lands_at_the_segment_seq(seg, seq):
    pkt = read(craft.reset_receiver(seg, seq), seg.version)
    tcp = pkt[TCP]
    assert (pkt.src, pkt.dst, tcp.sport, tcp.dport) == (seg.src, seg.dst, seg.sport, seg.dport)
    assert (tcp.seq, int(tcp.flags), bytes(tcp.payload)) == (
        seg.seq if seq is None else seq, RST, b"")


@given(segments())
def test_the_probe_is_a_bare_ack_at_the_segment_seq(seg):
    tcp = read(craft.probe_receiver(seg), seg.version)[TCP]
    assert (tcp.seq, tcp.ack, int(tcp.flags), bytes(tcp.payload)) == (seg.seq, seg.ack, ACK, b"")


@given(segments())
def test_the_sender_reset_follows_rfc_9293(seg):
    pkt = read(craft.reset_sender(seg), seg.version)
    tcp = pkt[TCP]
    assert (pkt.src, pkt.dst, tcp.sport, tcp.dport) == (seg.dst, seg.src, seg.dport, seg.sport)
    if seg.flags & ACK:
        assert (tcp.seq, int(tcp.flags)) == (seg.ack, RST)
    else:
        assert (tcp.seq, tcp.ack, int(tcp.flags)) == (0, (seg.seq + space(seg)) & 0xFFFFFFFF,
                                                      RST | ACK)


@given(segments())
def test_the_engine_reads_its_own_packets(seg):
    back = parse(craft.reply_and_close(seg, b"550 5.7.1 no\r\n"))
    assert (back.src, back.dst, back.payload) == (seg.dst, seg.src, b"550 5.7.1 no\r\n")
