"""sapd-nfq's engine on the fnfqueue binding with the queue's GSO flag: the
alternative to netfilterqueue, measured next to the daemon before anything
switches. Bench only: it carries out ACCEPT, DROP, BYPASS and rewritten
packets like `sapd-nfq run`, but injects nothing (the benchmark's traffic is
never refused) and has no control socket. Its rules are sapd-nfq's (`up`).

    python -m bench.fnfq_engine --config FILE
"""

from __future__ import annotations

import argparse
import signal
import time
from pathlib import Path

import fnfqueue

from bench.floor import open_fnfqueue
from sapd_nfq.engine.core import Engine
from sapd_nfq.engine.verdicts import ACCEPT, BYPASS
from sapd_nfq.kernel.marks import BYPASS_MARK
from sapd_nfq.wiring.build import load_policy, open_logins
from sapd_nfq.wiring.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fnfq_engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    config = load_config(args.config)
    logins = open_logins(config)
    engine = Engine(config, load_policy(config, logins), logins)
    conn = open_fnfqueue()
    queue = conn.bind(config.queue)
    queue.set_mode(fnfqueue.MAX_PAYLOAD, fnfqueue.COPY_PACKET)
    queue.set_maxlen(config.queue_maxlen)
    queue.gso = True
    print(f"engine bound to queue {config.queue} (fnfqueue, gso)", flush=True)
    while True:
        try:
            for packet in conn:
                # Not packet.truncated: fnfqueue 1.1.2 compares cdata pointers with
                # `is not`, so it is always True. parse() compares the IP length
                # with the bytes received instead, and drops a truncated packet.
                decision = engine.handle(packet.payload, time.time())
                if decision.packet is not None:
                    packet.payload = decision.packet
                if decision.verdict is ACCEPT:
                    packet.mangle()
                elif decision.verdict is BYPASS:
                    try:
                        mark = packet.mark
                    except fnfqueue.NoSuchAttributeException:
                        mark = 0
                    packet.mark = mark | BYPASS_MARK
                    packet.verdict(fnfqueue.REPEAT, fnfqueue.MANGLE_MARK
                                   | (fnfqueue.MANGLE_PAYLOAD if decision.packet else 0))
                else:
                    packet.drop()
        except fnfqueue.BufferOverflowException:
            conn.reset()


if __name__ == "__main__":
    raise SystemExit(main())
