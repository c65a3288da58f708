"""`python -m bench.engine_micro [-p]`: the pure engine's CPU per packet.

Two workloads, each recorded once (tests/engine_helpers.py builds the
packets) and replayed into fresh engines; the best of 25 replays is reported,
in microseconds per packet:
- a message's DATA phase: 2,000 full-sized segments of message text, a pure
  ACK from the server for every two;
- short sessions as the benchmark's load runs them (bench/load.py): 64
  clients each open, read the greeting, send EHLO, MAIL, RCPT and QUIT, and
  close, every packet as the queue sees it, the handshake and the closing
  FINs included.
`-p` profiles one replay of each. No kernel and no queue: this is what the
engine adds to the callback. It measures the engine the import chose
(sapd_nfq/compiled.py): compare with SAPD_NFQ_ENGINE=python and
SAPD_NFQ_ENGINE=compiled.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from engine_helpers import Conn, make_engine

from sapd_nfq import ENGINE

SEGMENTS = 2000
REPLAYS = 25
LINE = b"x" * 76 + b"\r\n"

Packet = tuple[bytes, float, "bool | None"]


def recorded(conn: Conn, packets: list[Packet]) -> Conn:
    """`conn`, each packet it feeds its engine also appended to `packets`."""
    feed = conn.feed

    def recording(packet: bytes, from_client_side: bool | None = None):
        packets.append((packet, conn.now + 0.01, from_client_side))
        return feed(packet, from_client_side)

    conn.feed = recording
    return conn


def envelope(conn: Conn, last: tuple[bytes, bytes]) -> None:
    """The greeting, EHLO, MAIL and RCPT of a local recipient, then `last`
    (a command and its reply)."""
    conn.smtp_greeting()
    for command, reply in ((b"MAIL FROM:<carol@external.example>", b"250 2.1.0 Ok"),
                           (b"RCPT TO:<alice@lab.example>", b"250 2.1.5 Ok"), last):
        conn.client(command + b"\r\n")
        conn.server(reply + b"\r\n")


def record() -> tuple[list[Packet], int, int]:
    """The session's packets, and where its DATA phase starts and ends."""
    packets: list[Packet] = []
    conn = recorded(Conn(make_engine(refusal="recipient")), packets)
    envelope(conn, (b"DATA", b"354 End data with <CR><LF>.<CR><LF>"))
    start = len(packets)
    text = (LINE * 19)[:1448]
    for i in range(SEGMENTS):
        conn.client(text, flags="A")
        if i % 2:
            conn.server(b"", flags="A")
    end = len(packets)
    conn.client(b"\r\n.\r\n")
    conn.server(b"250 2.0.0 Ok: queued\r\n")
    return packets, start, end


def record_sessions(clients: int = 64) -> list[Packet]:
    """The packets of `clients` short sessions, one after the other."""
    engine = make_engine(refusal="recipient")
    packets: list[Packet] = []
    for n in range(clients):
        conn = recorded(Conn(engine, client=f"198.18.1.{n + 2}", cport=40000 + n), packets)
        envelope(conn, (b"QUIT", b"221 2.0.0 Bye"))
        conn.server(b"", flags="FA")
        conn.client(b"", flags="FA")
        conn.server(b"", flags="A")
    return packets


def replay(packets: list[Packet], start: int, end: int, profile: cProfile.Profile | None = None
           ) -> float:
    engine = make_engine(refusal="recipient")
    for packet, now, side in packets[:start]:
        engine.handle(packet, now, from_client_side=side)
    if profile is not None:
        profile.enable()
    began = time.perf_counter()
    for packet, now, side in packets[start:end]:
        engine.handle(packet, now, from_client_side=side)
    took = time.perf_counter() - began
    if profile is not None:
        profile.disable()
    return took / (end - start)


def main() -> None:
    data, start, end = record()
    sessions = record_sessions()
    print(f"{ENGINE.engine} engine")
    for what, (packets, first, last) in (("DATA phase", (data, start, end)),
                                         ("short sessions", (sessions, 0, len(sessions)))):
        best = min(replay(packets, first, last) for _ in range(REPLAYS))
        print(f"{what}: {best * 1e6:.2f} us per packet over {last - first} packets")
        if "-p" in sys.argv:
            profile = cProfile.Profile()
            replay(packets, first, last, profile)
            pstats.Stats(profile).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
