"""The queue's configuration and verdict messages and the kernel's answers, as bytes.

Pure functions over the layouts of <linux/netlink.h>, <linux/netfilter/nfnetlink.h>
and <linux/netfilter/nfnetlink_queue.h>; queue_socket.py does the I/O.

netfilterqueue caps the copy range at 4016 bytes in `bind()` and never sets
the queue's flags, so the daemon sends its own NFQNL_MSG_CONFIG after every
bind: copy mode packet, copy range 65531 (the most a netlink attribute
holds; the kernel clamps anything larger to it), and the GSO flag, which has
the kernel queue GRO/TSO super-packets whole instead of cutting them into
MTU-size segments first. The flag needs its mask beside it, and a kernel
that does not know a flag refuses the whole message (EOPNOTSUPP), copy range
included: the caller then sends it again without the flag.

A batch verdict (NFQNL_MSG_VERDICT_BATCH) gives its verdict to every packet
still waiting in the queue whose id is at most the one it names: the kernel
keeps a queue's packets in the order of their ids.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NF_DROP = 0
NF_ACCEPT = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_GSO = 1 << 2
#: the kernel's NFQNL_MAX_COPY_RANGE: 0xFFFF less a netlink attribute header
MAX_COPY_RANGE = 0xFFFF - 4

# struct nlmsghdr (host order): length, type, flags, seq, port id
_NLMSGHDR = struct.Struct("=IHHII")
_LENGTH_TYPE = struct.Struct("=IH")
# struct nfgenmsg: family, version, resource id (the queue number, big-endian)
_NFGENMSG = struct.Struct("=BB")
_RES_ID = struct.Struct("!H")
# struct nlattr (host order): length, type
_NLATTR = struct.Struct("=HH")
# struct nfqnl_msg_config_params, packed: copy range (be32), copy mode (u8)
_PARAMS = struct.Struct("!IB")
_BE32 = struct.Struct("!I")
# struct nfqnl_msg_verdict_hdr: verdict, packet id (both be32); the packet
# header NFQA_PACKET_HDR opens with the packet id too
_VERDICT = struct.Struct("!II")
# the answer's error field (s32, host order) ahead of the request's header
_ERRNO = struct.Struct("=i")


def _attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (the padding is not in its length)."""
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _request(queue: int, kind: int, seq: int, attributes: bytes, flags: int = NLM_F_REQUEST) -> bytes:
    """One nfnetlink request to the queue subsystem about `queue`."""
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue {queue} out of range 0..65535")
    body = _NFGENMSG.pack(0, 0) + _RES_ID.pack(queue) + attributes  # AF_UNSPEC, NFNETLINK_V0
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), NFNL_SUBSYS_QUEUE << 8 | kind, flags, seq, 0) + body


def config_message(queue: int, seq: int, *, copy_range: int = MAX_COPY_RANGE,
                   gso: bool = True) -> bytes:
    """NFQNL_MSG_CONFIG for `queue`: copy mode packet, `copy_range`, and the
    GSO flag with its mask when `gso`; the kernel answers with an ACK."""
    if not 0 < copy_range <= MAX_COPY_RANGE:
        raise ValueError(f"copy range {copy_range} out of range 1..{MAX_COPY_RANGE}")
    attributes = _attribute(NFQA_CFG_PARAMS, _PARAMS.pack(copy_range, NFQNL_COPY_PACKET))
    if gso:
        attributes += _attribute(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_GSO))
        attributes += _attribute(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_GSO))
    return _request(queue, NFQNL_MSG_CONFIG, seq, attributes, NLM_F_REQUEST | NLM_F_ACK)


def verdict_message(queue: int, seq: int, packet_id: int, verdict: int, *, batch: bool) -> bytes:
    """`verdict` for packet `packet_id` of `queue`, or with `batch` for every
    packet waiting up to and including it. No ACK is asked for: an error
    still comes back (NLMSG_ERROR), and the reader logs it."""
    attributes = _attribute(NFQA_VERDICT_HDR, _VERDICT.pack(verdict, packet_id))
    return _request(queue, NFQNL_MSG_VERDICT_BATCH if batch else NFQNL_MSG_VERDICT, seq, attributes)


@dataclass(frozen=True, slots=True)
class Answer:
    """The kernel's answer to a request: errno 0 is its ACK."""

    seq: int
    errno: int


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received datagram, split: the messages for the binding (packets),
    the kernel's answers, and whether its last message was cut short (then
    the id of its packet, if the cut left it: the binding cannot read that
    message, so the packet's verdict is the reader's to give)."""

    packets: bytes
    answers: tuple[Answer, ...]
    cut: bool
    cut_id: int | None = None


def lone_packet(datagram: bytes) -> bool:
    """Whether the datagram is a single message for the binding, as nearly
    every one is: then it goes to the binding as it came, unsplit."""
    if len(datagram) < _NLMSGHDR.size:
        return False
    length, kind = _LENGTH_TYPE.unpack_from(datagram)
    return bool(kind != NLMSG_ERROR and len(datagram) - 4 < length <= len(datagram))


def split(datagram: bytes) -> Datagram:
    """Take the kernel's answers (NLMSG_ERROR) out of a datagram.

    The rest keeps its bytes, for the binding to read as it would have. A
    message whose length runs past the datagram (a receive buffer too small)
    is left with the packets, and `cut` says so.
    """
    packets: list[bytes] = []
    answers: list[Answer] = []
    cut = False
    cut_id = None
    for start, end, kind, seq in _messages(datagram):
        if end > len(datagram):
            cut = True
            cut_id = _packet_id(datagram, start, kind)
            packets.append(datagram[start:])
        elif kind == NLMSG_ERROR and end - start >= _NLMSGHDR.size + _ERRNO.size:
            (error,) = _ERRNO.unpack_from(datagram, start + _NLMSGHDR.size)
            answers.append(Answer(seq, -error))
        else:  # with its padding, as it came
            packets.append(datagram[start:end + (-(end - start) % 4)])
    return Datagram(b"".join(packets), tuple(answers), cut, cut_id)


def _packet_id(datagram: bytes, start: int, kind: int) -> int | None:
    """The id in a packet message's NFQA_PACKET_HDR, if the bytes hold it."""
    if kind != NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET:
        return None
    at = start + _NLMSGHDR.size + _NFGENMSG.size + _RES_ID.size
    while at + _NLATTR.size <= len(datagram):
        length, attribute = _NLATTR.unpack_from(datagram, at)
        if length < _NLATTR.size:
            return None
        if attribute & 0x3FFF == NFQA_PACKET_HDR:  # without the nested/byte-order bits
            if length < _NLATTR.size + _BE32.size or at + _NLATTR.size + _BE32.size > len(datagram):
                return None
            return int(_BE32.unpack_from(datagram, at + _NLATTR.size)[0])
        at += length + (-length % 4)
    return None


def _messages(datagram: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(start, end, type, seq) of each message; the last may end past the data."""
    start = 0
    while start + _NLMSGHDR.size <= len(datagram):
        length, kind, _, seq, _ = _NLMSGHDR.unpack_from(datagram, start)
        if length < _NLMSGHDR.size:
            # a header that cannot be right: hand the rest over as it is
            yield start, len(datagram), 0, seq
            return
        yield start, start + length, kind, seq
        start += length + (-length % 4)
