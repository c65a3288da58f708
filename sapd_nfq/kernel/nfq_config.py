"""The queue's configuration message and the kernel's answers, as bytes.

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
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_CONFIG = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2
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
# the answer's error field (s32, host order) ahead of the request's header
_ERRNO = struct.Struct("=i")


def _attribute(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (the padding is not in its length)."""
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def config_message(queue: int, seq: int, *, copy_range: int = MAX_COPY_RANGE,
                   gso: bool = True) -> bytes:
    """NFQNL_MSG_CONFIG for `queue`: copy mode packet, `copy_range`, and the
    GSO flag with its mask when `gso`; the kernel answers with an ACK."""
    if not 0 <= queue <= 0xFFFF:
        raise ValueError(f"queue {queue} out of range 0..65535")
    if not 0 < copy_range <= MAX_COPY_RANGE:
        raise ValueError(f"copy range {copy_range} out of range 1..{MAX_COPY_RANGE}")
    body = _NFGENMSG.pack(0, 0) + _RES_ID.pack(queue)  # AF_UNSPEC, NFNETLINK_V0
    body += _attribute(NFQA_CFG_PARAMS, _PARAMS.pack(copy_range, NFQNL_COPY_PACKET))
    if gso:
        body += _attribute(NFQA_CFG_FLAGS, _BE32.pack(NFQA_CFG_F_GSO))
        body += _attribute(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_GSO))
    kind = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + body


@dataclass(frozen=True, slots=True)
class Answer:
    """The kernel's answer to a request: errno 0 is its ACK."""

    seq: int
    errno: int


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received datagram, split: the messages for the binding (packets),
    the kernel's answers, and whether its last message was cut short."""

    packets: bytes
    answers: tuple[Answer, ...]
    cut: bool


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
    for start, end, kind, seq in _messages(datagram):
        if end > len(datagram):
            cut = True
            packets.append(datagram[start:])
        elif kind == NLMSG_ERROR and end - start >= _NLMSGHDR.size + _ERRNO.size:
            (error,) = _ERRNO.unpack_from(datagram, start + _NLMSGHDR.size)
            answers.append(Answer(seq, -error))
        else:  # with its padding, as it came
            packets.append(datagram[start:end + (-(end - start) % 4)])
    return Datagram(b"".join(packets), tuple(answers), cut)


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
