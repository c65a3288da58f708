"""Drive the engine with real packet bytes, as both ends of a TCP connection.

`Conn` keeps each side's sequence numbers like a real TCP would: a segment the
engine dropped is not counted as delivered, so the next one is a retransmission
of it, as the peer's TCP would send it.
"""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from sapd_nfq.engine.core import Engine
from sapd_nfq.engine.logins import MemoryLoginStore
from sapd_nfq.engine.policy import RelayPolicy
from sapd_nfq.engine.verdicts import DROP, Decision
from sapd_nfq.engine.virtusertable import VirtUserTable
from sapd_nfq.wiring.config import Config

VIRTUSERTABLE = """\
# the lab's mail domain
alice@lab.example   alice
bob@lab.example     bob
postmaster@lab.example  alice
nobody@lab.example  error:nouser
"""

CLIENT4, SERVER4 = "198.18.1.2", "198.18.2.2"
CLIENT6, SERVER6 = "2001:db8:1::2", "2001:db8:2::2"


def make_engine(**config) -> Engine:
    """An engine on the test table. It refuses whole sessions unless told
    `refusal="recipient"`: most tests tell that a command was judged by the
    session refusal's drop and reset (test_refusal.py covers the other)."""
    logins = MemoryLoginStore()
    cfg = Config(**{"state": "memory", "refusal": "session", **config})
    policy = RelayPolicy(VirtUserTable.parse(VIRTUSERTABLE, "test-virtusertable"), logins,
                         trusted_networks=cfg.trusted_networks,
                         never_relay_networks=cfg.never_relay_networks)
    return Engine(cfg, policy, logins)


class Conn:
    def __init__(self, engine: Engine, *, client: str = CLIENT4, server: str = SERVER4,
                 cport: int = 40000, sport: int = 25, now: float = 1000.0,
                 ingress: bool = False) -> None:
        self.engine = engine
        self.client_addr, self.server_addr = client, server
        self.cport, self.sport = cport, sport
        self.cseq, self.sseq = 1000, 500000
        self.now = now
        self.v6 = ":" in client
        #: tell the engine where each packet came in, as the daemon does
        self.ingress = ingress

    def packet(self, from_client: bool, payload: bytes = b"", flags: str = "PA",
               seq: int | None = None, ack: int | None = None, **tcp: object) -> bytes:
        """One segment's bytes; `tcp` are further scapy TCP fields (urgptr, options)."""
        ip = IPv6 if self.v6 else IP
        if from_client:
            src, dst, sp, dp = self.client_addr, self.server_addr, self.cport, self.sport
            seq = self.cseq if seq is None else seq
            ack = self.sseq if ack is None else ack
        else:
            src, dst, sp, dp = self.server_addr, self.client_addr, self.sport, self.cport
            seq = self.sseq if seq is None else seq
            ack = self.cseq if ack is None else ack
        return bytes(ip(src=src, dst=dst) / TCP(sport=sp, dport=dp, seq=seq & 0xFFFFFFFF,
                                                ack=ack & 0xFFFFFFFF, flags=flags, **tcp) / payload)

    def feed(self, packet: bytes, from_client_side: bool | None = None) -> Decision:
        self.now += 0.01
        return self.engine.handle(packet, self.now, from_client_side=from_client_side)

    def _feed_side(self, from_client: bool, data: bytes, flags: str) -> Decision:
        return self.feed(self.packet(from_client, data, flags),
                         from_client if self.ingress else None)

    def forge(self, data: bytes, flags: str = "PA") -> Decision:
        """A segment with the server's addresses, ports and next sequence
        number, put on the client's link: it comes in from the client side."""
        return self.feed(self.packet(False, data, flags), from_client_side=True)

    def handshake(self) -> list[Decision]:
        side = (lambda c: c) if self.ingress else (lambda c: None)
        d1 = self.feed(self.packet(True, flags="S", ack=0), side(True))
        self.cseq += 1
        d2 = self.feed(self.packet(False, flags="SA"), side(False))
        self.sseq += 1
        d3 = self.feed(self.packet(True, flags="A"), side(True))
        return [d1, d2, d3]

    def client(self, data: bytes, flags: str = "PA") -> Decision:
        decision = self._feed_side(True, data, flags)
        if decision.verdict is not DROP:
            self.cseq += len(data) + ("F" in flags)
        return decision

    def server(self, data: bytes, flags: str = "PA") -> Decision:
        decision = self._feed_side(False, data, flags)
        if decision.verdict is not DROP:
            self.sseq += len(data) + ("F" in flags)
        return decision

    def smtp_greeting(self) -> None:
        self.handshake()
        self.server(b"220 mx.lab.example ESMTP Postfix\r\n")
        self.client(b"EHLO client.example\r\n")
        self.server(b"250-mx.lab.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 CHUNKING\r\n")

    def pop3_login(self, user: bytes = b"alice") -> Decision:
        self.handshake()
        self.server(b"+OK Dovecot ready.\r\n")
        self.client(b"USER " + user + b"\r\n")
        self.server(b"+OK\r\n")
        self.client(b"PASS secret\r\n")
        return self.server(b"+OK Logged in.\r\n")
