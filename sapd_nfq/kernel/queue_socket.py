"""The queue binding's netlink socket: read by the daemon a whole datagram at
a time, and the plain accepts' verdicts given in batches.

netfilterqueue's `run()` receives into a 4,096-byte buffer, so a longer
packet's message is cut and never gets a verdict. `run_socket(reader)` asks
`reader.recv()` for each datagram instead and hands whatever it returns to
the library: this reader returns each datagram whole (its buffer holds a
64 KB packet and its attributes), keeps the kernel's answers to the daemon's
own requests (NLMSG_ERROR) away from the library, and counts what the kernel
could not deliver.

Most packets are plain accepts. Their verdicts wait, and one batch verdict
(NFQNL_MSG_VERDICT_BATCH) gives them all, as Suricata's NFQ mode does: it
goes when BATCH of them wait, before any other verdict (a drop, a rewrite, a
mark) and before anything is injected, and whenever the socket has nothing
more to read. So packets leave in the order they came, and none waits for a
packet that has not arrived. A batch accepts every packet before it still
in the queue: one whose message was cut, which the binding cannot read, is
dropped by its own verdict first.

It works on a duplicate of the binding's descriptor and never changes the
descriptor's mode (the library's own requests wait on it): its reads pass
MSG_DONTWAIT instead.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import deque

from netfilterqueue import NetfilterQueue

from ..engine.errors import SapdError
from ..wiring.logsetup import LOGGER
from .nfq_config import (
    MAX_COPY_RANGE,
    NF_ACCEPT,
    NF_DROP,
    Datagram,
    config_message,
    lone_packet,
    split,
    verdict_message,
)

log = logging.getLogger(LOGGER)

#: one netlink message of a packet at the full copy range, with room for
#: its attributes (headers, marks, interfaces, addresses, time, security context)
DATAGRAM_SIZE = MAX_COPY_RANGE + 8192
#: how long the kernel may take to answer the configuration (it answers at once)
ANSWER_TIMEOUT = 2.0
#: plain accepts given one batch verdict at most (Suricata's `batchcount`): a
#: packet waits for at most this many others' judging
BATCH = 20


class QueueConfigError(SapdError):
    """The kernel refused the queue's configuration."""


def receive_buffer(queue_maxlen: int) -> int:
    """`bind(sock_len=...)` for a queue's worth of full-size packets (the kernel
    doubles what it is given; setsockopt takes an int)."""
    return min(queue_maxlen * DATAGRAM_SIZE // 2, (2**31 - 1) // 2)


class QueueSocket:
    """`recv()` for `NetfilterQueue.run_socket`, and the queue's configuration."""

    def __init__(self, fd: int, queue: int) -> None:
        self.queue = queue
        self.sock = socket.socket(fileno=os.dup(fd))
        self._pending: deque[bytes] = deque()  # packets read while waiting for an answer
        self._seq = 0
        #: True once the kernel took the GSO flag, False if it refused it
        self.gso: bool | None = None
        #: times the kernel found the receive buffer full (it dropped packets then)
        self.overruns = 0
        #: datagrams longer than DATAGRAM_SIZE (their packets are dropped)
        self.cut = 0
        #: the last plain accept waiting for the batch verdict, and how many wait
        self._accept_to: int | None = None
        self._waiting = 0
        #: batch verdicts sent, and verdicts the socket would not take
        self.batches = 0
        self.verdict_errors = 0

    def close(self) -> None:
        self.sock.close()

    def configure(self) -> None:
        """Send the queue's configuration and read the kernel's answer: the GSO
        flag, or the copy range alone on a kernel that refuses the flag."""
        error = self._ask(gso=True)
        self.gso = not error
        if error == errno.EOPNOTSUPP:
            log.warning("queue %d: the kernel refuses the GSO flag (%s); it cuts GRO/TSO "
                        "super-packets into segments before queueing them, one callback each",
                        self.queue, os.strerror(error))
            error = self._ask(gso=False)
        if error:
            raise QueueConfigError(f"queue {self.queue}: the kernel refused copy range "
                                   f"{MAX_COPY_RANGE}: {os.strerror(error)}")
        log.info("queue %d: copy range %d, GSO %s", self.queue, MAX_COPY_RANGE,
                 "on" if self.gso else "off")

    def feed(self, nfq: NetfilterQueue) -> None:
        """Hand the binding every datagram waiting, each whole; then give the
        waiting accepts their verdict."""
        try:
            nfq.run_socket(self)  # type: ignore[arg-type]  # it only ever calls recv()
        finally:
            self.flush()

    def accept_later(self, packet_id: int) -> None:
        """Accept the packet with the next batch verdict."""
        self._accept_to = packet_id
        self._waiting += 1
        if self._waiting >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Give the waiting accepts their verdict now."""
        if self._accept_to is None:
            return
        if self._verdict(self._accept_to, NF_ACCEPT, batch=True):
            self.batches += 1
            self._accept_to = None
            self._waiting = 0

    def _verdict(self, packet_id: int, verdict: int, *, batch: bool) -> bool:
        self._seq += 1
        try:
            self.sock.send(verdict_message(self.queue, self._seq, packet_id, verdict, batch=batch))
        except OSError as exc:  # the packets wait in the kernel; the next flush tries again
            self.verdict_errors += 1
            log.error("queue %d: cannot send a verdict: %s", self.queue, exc)
            return False
        return True

    def recv(self, _bufsize: int = 0) -> bytes:
        """The next datagram of packets, whole; BlockingIOError when none waits.

        `_bufsize` is the library's 4,096 bytes, and ignored."""
        if self._pending:
            return self._pending.popleft()
        while True:
            datagram = self._receive()
            if datagram is None:
                raise BlockingIOError(errno.EAGAIN, "no datagram waiting")
            if lone_packet(datagram):
                return datagram
            parts = self._split(datagram)
            for answer in parts.answers:  # none is awaited here
                if answer.errno:
                    log.error("queue %d: the kernel answered request %d with %s",
                              self.queue, answer.seq, os.strerror(answer.errno))
            if parts.packets:
                return parts.packets

    def _receive(self) -> bytes | None:
        """One datagram (empty after an overrun); None if none waits."""
        try:
            return self.sock.recv(DATAGRAM_SIZE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            # The kernel dropped packets it could not deliver: to the stream
            # inspection they are gaps, like any other loss.
            self.overruns += 1
            log.warning("queue %d: receive buffer full; the kernel dropped packets", self.queue)
            return b""

    def _split(self, datagram: bytes) -> Datagram:
        """The datagram's packets and the kernel's answers, apart."""
        parts = split(datagram)
        if parts.cut:
            self.cut += 1
            log.error("queue %d: a datagram longer than %d bytes was cut; its packet is dropped",
                      self.queue, DATAGRAM_SIZE)
            # The kernel sends each packet in a datagram of its own, its id in
            # the first attribute: a cut leaves the id.
            if parts.cut_id is not None:
                self._verdict(parts.cut_id, NF_DROP, batch=False)
        return parts

    def _ask(self, *, gso: bool) -> int:
        """Send the configuration; the errno of the kernel's answer (0: ACK).
        Packets read meanwhile wait for `recv()`."""
        self._seq += 1
        seq = self._seq
        self.sock.send(config_message(self.queue, seq, gso=gso))
        poll = select.poll()
        poll.register(self.sock, select.POLLIN)
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while poll.poll(max(0.0, deadline - time.monotonic()) * 1000):
            datagram = self._receive()
            if datagram is None:
                continue
            parts = self._split(datagram)
            if parts.packets:
                self._pending.append(parts.packets)
            for answer in parts.answers:
                if answer.seq == seq:
                    return answer.errno
        raise QueueConfigError(f"queue {self.queue}: no answer from the kernel to the "
                               f"queue's configuration in {ANSWER_TIMEOUT:g} s")
