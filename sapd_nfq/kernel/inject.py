"""The raw sockets that send the engine's crafted packets.

Each socket carries SO_MARK = INJECT_MARK, and the rules let that mark
by ahead of the NFQUEUE rule, so an injected packet is never queued again.
"""

from __future__ import annotations

import socket

from .marks import INJECT_MARK

SO_MARK = getattr(socket, "SO_MARK", 36)


class Injector:
    def __init__(self) -> None:
        self._v4 = self._open(socket.AF_INET)
        self._v6 = self._open(socket.AF_INET6)

    @staticmethod
    def _open(family: int) -> socket.socket:
        # IPPROTO_RAW: we supply the IP header ourselves (IP_HDRINCL implied).
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, INJECT_MARK)
        return sock

    def send(self, packet: bytes) -> None:
        if packet[0] >> 4 == 4:
            self._v4.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))
        else:
            self._v6.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0))

    def close(self) -> None:
        self._v4.close()
        self._v6.close()
