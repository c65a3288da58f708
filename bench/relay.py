"""A userspace relay in the style of the original SAPD: the design sapd-nfq replaces.

SAPD sat in front of the MTA as a TCP proxy. This one does the same job with
asyncio: the gateway redirects the mail ports to it (iptables REDIRECT), it
reads the original destination (SO_ORIGINAL_DST), opens its own connection to
the server and copies bytes both ways. It makes the same decisions as
sapd-nfq, with the same protocol machines and relay table: it reads the
envelope and refuses a RCPT the table fails with `550 5.7.1` before the MTA
sees it, hides STARTTLS, learns POP3 logins from the server's `+OK`, and
after a login copies the POP3 session without looking. The MTA sees the
relay's address, not the client's: the price of the design.

    python -m bench.relay --virtusertable FILE --smtp-port 10025 --pop3-port 10110
    python -m bench.relay ... --upstream-smtp HOST:PORT   # fixed server, no REDIRECT
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import time
from pathlib import Path

from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.events import (
    LoginSucceeded,
    MailFrom,
    RcptTo,
    SessionReset,
    StartTLSRequested,
    TLSOffered,
)
from sapd_nfq.engine.logins import MemoryLoginStore
from sapd_nfq.engine.policy import Fail, RelayPolicy
from sapd_nfq.engine.pop3 import POP3Machine
from sapd_nfq.engine.smtp import SMTPMachine
from sapd_nfq.engine.virtusertable import VirtUserTable

from . import serving
from .serving import serve_until_stopped

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
AUTH_TTL = 1800

RELAY_DENIED = b"550 5.7.1 Relaying denied: log in by POP3 first\r\n"
SMTP_REFUSED = b"554 5.7.1 Session refused by the relay\r\n"
SMTP_NO_TLS = b"454 4.7.0 TLS not available\r\n"

Address = tuple[str, int]


def original_dst(sock: socket.socket) -> Address:
    """Where the client meant to connect before the REDIRECT (IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class Inspector:
    """The decisions on one session; feeds both byte streams to the protocol machine.

    `client(data)` returns the bytes to pass to the server, or raises Refused
    with the reply the client gets; `server(data)` returns the bytes to pass to
    the client. `done` says the session needs no more inspection.
    """

    def __init__(self, smtp: bool, client: str, policy: RelayPolicy, logins: MemoryLoginStore) -> None:
        self.smtp = smtp
        self.client_address = client
        self.policy = policy
        self.logins = logins
        self.machine = SMTPMachine() if smtp else POP3Machine()
        self.sender = ""
        self.authenticated = False  # a 235 to SMTP AUTH on this session
        self.server_offset = 0
        self.hidden: list[tuple[int, int]] = []
        self.done = False

    def client(self, data: bytes) -> bytes:
        try:
            events = self.machine.receive_client(data)
        except ProtocolError:
            if self.smtp:
                raise Refused(SMTP_REFUSED) from None
            self.done = True  # POP3 trouble only loses a login
            return data
        now = time.time()
        for event in events:
            if isinstance(event, RcptTo):
                verdict = self.policy.decide(self.client_address, self.sender, event.recipient, now,
                                             authenticated=self.authenticated)
                if isinstance(verdict, Fail):
                    raise Refused(RELAY_DENIED)
            elif isinstance(event, MailFrom):
                self.sender = event.sender
            elif isinstance(event, SessionReset):
                self.sender = ""
            elif isinstance(event, StartTLSRequested):
                raise Refused(SMTP_NO_TLS if self.smtp else b"-ERR TLS not available\r\n")
        return data

    def server(self, data: bytes) -> bytes:
        start = self.server_offset
        self.server_offset += len(data)
        try:
            events = self.machine.receive_server(data)
        except ProtocolError:
            if self.smtp:
                raise Refused(SMTP_REFUSED) from None
            self.done = True
            return data
        for event in events:
            if isinstance(event, TLSOffered):
                self.hidden.append((event.offset, event.length))
            elif isinstance(event, LoginSucceeded):
                if self.smtp:
                    self.authenticated = True
                else:
                    self.logins.add(self.client_address, event.user, time.time(), AUTH_TTL,
                                    source="pop3")
        if self.machine.settled:
            self.done = True
        return _hide(data, start, self.hidden) if self.hidden else data


def _hide(data: bytes, start: int, ranges: list[tuple[int, int]]) -> bytes:
    """Overwrite the hidden ranges (stream offsets) that fall in this chunk with X."""
    end = start + len(data)
    out = None
    for offset, length in ranges:
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            out = out or bytearray(data)
            out[lo - start:hi - start] = b"X" * (hi - lo)
    return bytes(out) if out is not None else data


class Refused(Exception):
    def __init__(self, reply: bytes) -> None:
        super().__init__(reply)
        self.reply = reply


class _Side(asyncio.Protocol):
    """One socket of a relayed session (asyncio reads up to 256 KiB at a time).
    When the other socket's send buffer fills, this side stops reading."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close this side; connection_lost closes the other

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()  # after what is buffered for it is sent


class ClientSide(_Side):
    def __init__(self, relay: Relay, smtp: bool) -> None:
        super().__init__()
        self.relay = relay
        self.smtp = smtp
        self.inspector: Inspector | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.pause_reading()  # until the server connection is up
        sock = transport.get_extra_info("socket")
        upstream = self.relay.upstream_smtp if self.smtp else self.relay.upstream_pop3
        try:
            target = upstream or original_dst(sock)
        except OSError:
            transport.close()
            return
        client = transport.get_extra_info("peername")[0]
        self.inspector = Inspector(self.smtp, client, self.relay.policy, self.relay.logins)
        self.relay.sessions += 1
        asyncio.get_running_loop().create_task(self._connect(target))

    async def _connect(self, target: Address) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, server = await loop.create_connection(lambda: ServerSide(self), *target)
        except OSError:
            self.transport.close()
            return
        self.peer = server
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        passed = self.inspect(data, from_client=True)
        if passed is not None:
            self.peer.transport.write(passed)

    def inspect(self, data: bytes, *, from_client: bool) -> bytes | None:
        """`data` as the inspector passes it on; None if the session was refused."""
        inspector = self.inspector
        if inspector is None:
            return data
        try:
            data = inspector.client(data) if from_client else inspector.server(data)
        except Refused as refused:
            self.refuse(refused.reply)
            return None
        if inspector.done:
            self.inspector = None
        return data

    def refuse(self, reply: bytes) -> None:
        self.relay.refused += 1
        self.inspector = None
        self.peer.peer = None
        self.peer.transport.abort()
        self.transport.write(reply)
        self.transport.close()


class ServerSide(_Side):
    def __init__(self, client: ClientSide) -> None:
        super().__init__()
        self.peer = client

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        client = self.peer
        if client is None:
            return
        passed = client.inspect(data, from_client=False)
        if passed is not None:
            client.transport.write(passed)


class Relay:
    def __init__(self, policy: RelayPolicy, logins: MemoryLoginStore,
                 upstream_smtp: Address | None = None, upstream_pop3: Address | None = None) -> None:
        self.policy = policy
        self.logins = logins
        self.upstream_smtp = upstream_smtp
        self.upstream_pop3 = upstream_pop3
        self.sessions = 0
        self.refused = 0

    async def listen(self, host: str, smtp_port: int, pop3_port: int) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        return [
            await loop.create_server(lambda: ClientSide(self, True), host, smtp_port, backlog=4096),
            await loop.create_server(lambda: ClientSide(self, False), host, pop3_port, backlog=4096),
        ]


def make_relay(virtusertable: Path, upstream_smtp: Address | None = None,
               upstream_pop3: Address | None = None) -> Relay:
    logins = MemoryLoginStore()
    policy = RelayPolicy(VirtUserTable.load(virtusertable), logins)
    return Relay(policy, logins, upstream_smtp, upstream_pop3)


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    relay = make_relay(args.virtusertable, args.upstream_smtp, args.upstream_pop3)
    servers = await relay.listen(args.host, args.smtp_port, args.pop3_port)
    await serve_until_stopped("relay", servers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--virtusertable", type=Path, required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--smtp-port", type=int, default=10025)
    parser.add_argument("--pop3-port", type=int, default=10110)
    parser.add_argument("--upstream-smtp", type=_address, help="HOST:PORT instead of SO_ORIGINAL_DST")
    parser.add_argument("--upstream-pop3", type=_address, help="HOST:PORT instead of SO_ORIGINAL_DST")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return serving.run(_main, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
