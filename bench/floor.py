"""The accept-only NFQUEUE callback: the floor of any Python NFQUEUE design.

Every queued packet costs a trip to userspace and a verdict back, whatever
the callback does; this one does nothing else, so no Python NFQUEUE program
can beat it on the same binding. `--binding fnfqueue` measures the
alternative binding (batched reads, 64 KiB copies) the same way, and
`--binding fnfqueue-gso` that binding with the queue's GSO flag set.

    python -m bench.floor --queue 0
"""

from __future__ import annotations

import argparse
import os
import signal
import socket


def run_netfilterqueue(queue: int, max_len: int) -> None:
    from netfilterqueue import NetfilterQueue

    nfq = NetfilterQueue()
    nfq.bind(queue, lambda packet: packet.accept(), max_len=max_len)
    print(f"floor bound to queue {queue} (netfilterqueue)", flush=True)
    try:
        nfq.run()
    finally:
        nfq.unbind()


#: netlink receive buffer for fnfqueue: with the GSO flag a queued packet can be
#: 64 KiB, and the default buffer (~200 KiB) overflows after three of them
RCVBUF = 16 << 20
SO_RCVBUFFORCE = 33  # asm-generic/socket.h; root may exceed rmem_max


def open_fnfqueue():
    """An fnfqueue Connection with a receive buffer that holds GSO packets."""
    import fnfqueue

    conn = fnfqueue.Connection()
    sock = socket.socket(fileno=os.dup(conn._conn.fd))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
    finally:
        sock.close()
    return conn


def run_fnfqueue(queue: int, max_len: int, gso: bool = False) -> None:
    import fnfqueue

    conn = open_fnfqueue()
    bound = conn.bind(queue)
    bound.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
    bound.set_maxlen(max_len)
    # With the GSO flag the kernel queues GRO/GSO super-packets whole instead of
    # segmenting them first: fewer, larger packets. (Only ever set it: fnfqueue
    # 1.1.2 turns a flag on when asked to turn it off.)
    if gso:
        bound.gso = True
    print(f"floor bound to queue {queue} (fnfqueue{', gso' if gso else ''})", flush=True)
    while True:
        try:
            for packet in conn:
                packet.accept()
        except fnfqueue.BufferOverflowException:
            conn.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=4096)
    parser.add_argument("--binding", choices=("netfilterqueue", "fnfqueue", "fnfqueue-gso"),
                        default="netfilterqueue")
    args = parser.parse_args(argv)
    # SIGTERM ends the process at once; the kernel unbinds the queue with the socket.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if args.binding == "netfilterqueue":
        run_netfilterqueue(args.queue, args.max_len)
    else:
        run_fnfqueue(args.queue, args.max_len, gso=args.binding == "fnfqueue-gso")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
