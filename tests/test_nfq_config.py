"""The queue's configuration and verdict messages against the kernel's struct
layouts, and the reader that hands netfilterqueue whole datagrams, keeps the
kernel's answers, and gives plain accepts in batches."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys

import pytest

from sapd_nfq.kernel.nfq_config import (
    MAX_COPY_RANGE,
    NF_ACCEPT,
    NF_DROP,
    Answer,
    config_message,
    lone_packet,
    split,
    verdict_message,
)
from sapd_nfq.kernel.queue_socket import BATCH, DATAGRAM_SIZE, QueueConfigError, QueueSocket, receive_buffer

little_endian = pytest.mark.skipif(sys.byteorder != "little", reason="netlink headers are in host order")

# Written out from the headers, not from the module: <linux/netlink.h> struct
# nlmsghdr {u32 len; u16 type; u16 flags; u32 seq; u32 pid}, <linux/netfilter/nfnetlink.h>
# struct nfgenmsg {u8 family; u8 version; be16 res_id}, struct nlattr {u16 len; u16 type},
# NFQA_CFG_PARAMS = struct nfqnl_msg_config_params {be32 copy_range; u8 copy_mode} packed.
CONFIG_GSO_QUEUE_7_SEQ_1 = bytes.fromhex(
    "30000000" "0203" "0500" "01000000" "00000000"  # 48 bytes, (QUEUE << 8) | CONFIG, REQUEST|ACK
    "00" "00" "0007"                                   # AF_UNSPEC, NFNETLINK_V0, queue 7
    "0900" "0200" "0000fffb" "02" "000000"            # PARAMS: copy range 65531, COPY_PACKET, pad
    "0800" "0500" "00000004"                           # FLAGS: NFQA_CFG_F_GSO
    "0800" "0400" "00000004")                          # MASK: NFQA_CFG_F_GSO
CONFIG_PLAIN_QUEUE_300_SEQ_9 = bytes.fromhex(
    "20000000" "0203" "0500" "09000000" "00000000"
    "00" "00" "012c"
    "0900" "0200" "0000fffb" "02" "000000")


@little_endian
def test_config_message_matches_the_kernel_layout():
    assert MAX_COPY_RANGE == 65531
    assert config_message(7, 1) == CONFIG_GSO_QUEUE_7_SEQ_1
    assert config_message(300, 9, gso=False) == CONFIG_PLAIN_QUEUE_300_SEQ_9


# struct nfqnl_msg_verdict_hdr {be32 verdict; be32 id}, as NFQA_VERDICT_HDR (2)
BATCH_ACCEPT_QUEUE_7_SEQ_3_TO_ID_0x01020304 = bytes.fromhex(
    "20000000" "0303" "0100" "03000000" "00000000"  # 32 bytes, (QUEUE << 8) | VERDICT_BATCH, REQUEST
    "00" "00" "0007"
    "0c00" "0200" "00000001" "01020304")              # NF_ACCEPT, up to id 0x01020304
DROP_QUEUE_1_SEQ_4_ID_77 = bytes.fromhex(
    "20000000" "0103" "0100" "04000000" "00000000"   # (QUEUE << 8) | VERDICT
    "00" "00" "0001"
    "0c00" "0200" "00000000" "0000004d")


@little_endian
def test_verdict_messages_match_the_kernel_layout():
    assert verdict_message(7, 3, 0x01020304, NF_ACCEPT, batch=True) == BATCH_ACCEPT_QUEUE_7_SEQ_3_TO_ID_0x01020304
    assert verdict_message(1, 4, 77, NF_DROP, batch=False) == DROP_QUEUE_1_SEQ_4_ID_77


@pytest.mark.parametrize("queue, copy_range", [(-1, 100), (65536, 100), (0, 0), (0, 65532)])
def test_config_message_refuses_what_the_kernel_cannot_take(queue, copy_range):
    with pytest.raises(ValueError):
        config_message(queue, 1, copy_range=copy_range)


def nlmsg(kind: int, seq: int, body: bytes, flags: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, flags, seq, 1234) + body + b"\0" * (-length % 4)


def answer(seq: int, error: int) -> bytes:
    """NLMSG_ERROR: s32 error, then the request's header (NLM_F_CAPPED: no more)."""
    return nlmsg(2, seq, struct.pack("=i", -error) + struct.pack("=IHHII", 48, 0x302, 5, seq, 0),
                 flags=0x100)


def packet_message(size: int, seq: int = 0) -> bytes:
    """An NFQNL_MSG_PACKET-shaped message (type (QUEUE << 8) | PACKET) of `size` body bytes."""
    return nlmsg(0x300, seq, bytes(range(256)) * (size // 256) + b"p" * (size % 256))


def queued_packet(packet_id: int, payload: int) -> bytes:
    """A packet message as the kernel builds it: nfgenmsg, NFQA_PACKET_HDR
    {be32 id; be16 hw protocol; u8 hook} first, then NFQA_PAYLOAD (10)."""
    header = struct.pack("!IHB", packet_id, 0x0800, 2) + b"\0"
    body = struct.pack("=BB", 2, 0) + struct.pack("!H", 7) + struct.pack("=HH", 4 + 7, 1) + header
    return nlmsg(0x300, 0, body + struct.pack("=HH", min(4 + payload, 0xFFFF), 10) + b"x" * payload)


def test_split_keeps_packets_whole_and_takes_the_answers_out():
    one = packet_message(65531 + 200)
    assert split(one).packets == one and split(one).answers == () and not split(one).cut
    mixed = packet_message(10) + answer(5, 0) + packet_message(3) + answer(6, errno.EOPNOTSUPP)
    parts = split(mixed)
    assert parts.packets == packet_message(10) + packet_message(3)
    assert parts.answers == (Answer(5, 0), Answer(6, errno.EOPNOTSUPP))
    assert split(answer(1, errno.EPERM)).packets == b""


def test_a_lone_packet_goes_as_it_came():
    assert lone_packet(packet_message(1600)) and lone_packet(packet_message(65531 + 301))
    assert not lone_packet(answer(1, 0))  # the daemon's, not the binding's
    assert not lone_packet(packet_message(10) + packet_message(10))
    assert not lone_packet(packet_message(5000)[:4096]) and not lone_packet(b"\0" * 8)


def test_split_says_when_a_message_was_cut():
    whole = packet_message(5000)
    parts = split(whole[:4096])  # what a 4,096-byte receive leaves of it
    assert parts.cut and parts.packets == whole[:4096] and parts.answers == ()


def test_a_cut_packet_message_keeps_its_id():
    assert split(queued_packet(0xDEADBEEF, 5000)[:4096]).cut_id == 0xDEADBEEF
    assert split(queued_packet(9, 10)).cut_id is None  # not cut
    assert split(packet_message(5000)[:4096]).cut_id is None  # no packet header in it


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", struct.pack("=IHHII", 3, 2, 0, 1, 0) + b"x" * 8])
def test_split_hands_over_what_it_cannot_read(garbage):
    parts = split(garbage)
    assert parts.answers == () and parts.packets == (garbage if len(garbage) >= 16 else b"")


def test_receive_buffer_holds_a_queue_of_full_size_packets_and_fits_an_int():
    assert receive_buffer(4096) * 2 >= 4096 * DATAGRAM_SIZE
    assert receive_buffer(10**6) * 2 < 2**31


# --- the reader, over a datagram socket pair standing in for netlink ------------


@pytest.fixture
def kernel():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (ours, theirs):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    reader = QueueSocket(ours.fileno(), 7)
    ours.close()  # the reader holds its own duplicate
    yield reader, theirs
    reader.close()
    theirs.close()


def drain(reader: QueueSocket) -> list[bytes]:
    """What netfilterqueue's run_socket would hand its parser, until the reader is empty."""
    got = []
    while True:
        try:
            got.append(reader.recv(4096))
        except BlockingIOError:
            return got


def test_reader_hands_over_each_datagram_whole(kernel):
    reader, theirs = kernel
    datagrams = [packet_message(n) for n in (40, 65531 + 300, 9000)]
    for datagram in datagrams:
        theirs.send(datagram)
    assert drain(reader) == datagrams


def test_reader_keeps_error_messages_from_the_binding(kernel, caplog):
    reader, theirs = kernel
    theirs.send(packet_message(100))
    theirs.send(answer(40, errno.EINVAL))
    theirs.send(answer(41, 0))
    theirs.send(packet_message(200))
    with caplog.at_level(logging.ERROR):
        assert drain(reader) == [packet_message(100), packet_message(200)]
    assert "request 40" in caplog.text and "Invalid argument" in caplog.text
    assert "request 41" not in caplog.text


def test_configure_sends_the_gso_flag_and_reads_the_ack(kernel):
    reader, theirs = kernel
    theirs.send(packet_message(64))  # a packet that was queued before the answer
    theirs.send(answer(1, 0))
    reader.configure()
    assert reader.gso is True
    assert theirs.recv(1000)[16:] == config_message(7, 1)[16:]
    assert drain(reader) == [packet_message(64)]


def test_a_kernel_without_the_gso_flag_gets_the_copy_range_alone(kernel, caplog):
    reader, theirs = kernel
    theirs.send(answer(1, errno.EOPNOTSUPP))
    theirs.send(answer(2, 0))
    with caplog.at_level(logging.WARNING):
        reader.configure()
    assert reader.gso is False
    assert "refuses the GSO flag" in caplog.text
    assert theirs.recv(1000) == config_message(7, 1)
    assert theirs.recv(1000) == config_message(7, 2, gso=False)


def test_a_refused_configuration_is_an_error(kernel):
    reader, theirs = kernel
    theirs.send(answer(1, errno.EPERM))
    with pytest.raises(QueueConfigError, match="Operation not permitted"):
        reader.configure()


def sent(theirs: socket.socket) -> list[bytes]:
    """What the reader sent the kernel, with the sequence numbers left out."""
    theirs.setblocking(False)
    out = []
    while True:
        try:
            message = theirs.recv(1000)
        except BlockingIOError:
            return out
        out.append(message[:8] + message[12:])


def verdict(packet_id: int, kind: int, batch: bool) -> bytes:
    message = verdict_message(7, 0, packet_id, kind, batch=batch)
    return message[:8] + message[12:]


def test_plain_accepts_wait_for_one_batch_verdict(kernel):
    reader, theirs = kernel
    for packet_id in (5, 6, 9):
        reader.accept_later(packet_id)
    assert sent(theirs) == []
    reader.flush()
    reader.flush()  # nothing waits: nothing sent
    assert sent(theirs) == [verdict(9, NF_ACCEPT, batch=True)]
    assert reader.batches == 1


def test_a_batch_goes_when_it_is_full(kernel):
    reader, theirs = kernel
    for packet_id in range(1, BATCH + 3):
        reader.accept_later(packet_id)
    assert sent(theirs) == [verdict(BATCH, NF_ACCEPT, batch=True)]


def test_feeding_ends_with_the_batch_verdict(kernel):
    reader, theirs = kernel

    class Binding:  # netfilterqueue's run_socket: reads until the socket is empty
        def run_socket(self, sock):
            drain(sock)
            reader.accept_later(41)
            reader.accept_later(42)

    theirs.send(packet_message(10))
    reader.feed(Binding())
    assert sent(theirs) == [verdict(42, NF_ACCEPT, batch=True)]


def test_a_verdict_the_socket_refuses_is_sent_again_at_the_next_flush(kernel, caplog):
    reader, theirs = kernel
    reader.accept_later(3)

    class Full:
        def send(self, _message):
            raise OSError(errno.ENOBUFS, "No buffer space available")

    real, reader.sock = reader.sock, Full()
    with caplog.at_level(logging.ERROR):
        reader.flush()
    reader.sock = real
    assert reader.verdict_errors == 1 and "cannot send a verdict" in caplog.text
    reader.accept_later(4)
    reader.flush()
    assert sent(theirs) == [verdict(4, NF_ACCEPT, batch=True)]


def test_a_cut_packet_is_dropped_by_its_own_verdict(kernel, caplog):
    # A later batch would accept every packet before it still in the queue:
    # the one the binding cannot read must be given its verdict first.
    reader, theirs = kernel
    theirs.send(queued_packet(77, DATAGRAM_SIZE + 100))
    with caplog.at_level(logging.ERROR):
        drain(reader)
    assert reader.cut == 1 and sent(theirs) == [verdict(77, NF_DROP, batch=False)]
