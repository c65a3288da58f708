"""Hand-made TCP from a lab host, for segments no kernel would send.

`RawTCP` is one TCP connection whose every segment the test chooses: sequence
numbers, flags, urgent pointer, TTL or hop limit, TCP options, IPv4 options
and IPv6 extension headers, fragments. IPv4 and IPv6 alike::

    with RawTCP(lab, "198.18.3.10", lab.server.ipv4, 25) as tcp:
        tcp.connect()
        assert tcp.reply().startswith(b"220")
        tcp.send(b"EHLO x\\r\\n")                     # at snd_nxt, which then advances
        tcp.send(b"RCPT", seq=tcp.snd_nxt + 9, advance=False)   # ahead of a gap
        ...

How: packets go out through a raw IP socket (IPPROTO_RAW: we write the IP
header, the kernel routes it), and the peer's come in on a packet socket on
the host's link. A receiver thread files each of the peer's segments
(`received`), assembles its in-order bytes (`data`, read with `reply` and
`read_line`) and acknowledges them, as a TCP would, so the peer never
retransmits. The host's own kernel knows nothing of the connection and would
answer the peer with RSTs: `silence_kernel` drops those (an OUTPUT rule in
the host for the connection's address and port; packets sent here carry a
mark that the rule lets by, so a RST the test sends still goes out).

Addresses must be the host's own (the receiving socket sees only its link),
except for a test that forges another sender on purpose: `send_raw` sends
any packet bytes as they are.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from scapy.layers.inet import IP, TCP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.packet import Packet

#: SO_MARK of the packets sent here: the kernel-RST drop rule lets them by
MARK = 0x7A5C
TIMEOUT = 10.0       # seconds to wait for the peer, unless told otherwise
PORTS = (10000, 30000)  # source ports picked at random: below the kernel's ephemeral range
_MASK = 0xFFFFFFFF
_ETH_P_ALL = 0x0003
_PACKET_HOST = 0
_ETHERTYPES = {0x0800: IP, 0x86DD: IPv6}
_POLL = 0.1


@contextmanager
def silence_kernel(lab: Any, host: str, src: str, sport: int | None = None) -> Iterator[None]:
    """Drop the RSTs `host`'s kernel sends from `src` (and `sport`, if given)
    while the block runs; packets marked MARK still go out."""
    tables = "ip6tables" if ":" in src else "iptables"
    rule = ["OUTPUT", "-s", src, "-p", "tcp", *(["--sport", str(sport)] if sport else []),
            "--tcp-flags", "RST", "RST", "-m", "mark", "!", "--mark", hex(MARK), "-j", "DROP"]
    lab.run(host, [tables, "-w", "-I", *rule], capture_output=True)
    try:
        yield
    finally:
        lab.run(host, [tables, "-w", "-D", *rule], check=False, capture_output=True)


@dataclass(frozen=True)
class Received:
    """One segment from the peer, as it arrived."""

    seq: int
    ack: int
    flags: str      # scapy's letters: "SA", "PA", "FA", "R", ...
    payload: bytes
    window: int
    time: float


class RawTCP:
    """One hand-made TCP connection from `src` (an address of `host`) to `dst`:`dport`.

    `timestamps` offers the TCP timestamp option in the SYN; once the peer
    agrees, every segment carries it (`send(tsval=...)` picks another value,
    say one PAWS throws away). `silence=False` leaves the kernel's RSTs alone
    (when a wider `silence_kernel` is in place already).
    """

    def __init__(self, lab: Any, src: str, dst: str, dport: int, *, sport: int | None = None,
                 host: str = "client", timestamps: bool = False, silence: bool = True,
                 window: int = 65535) -> None:
        self.lab, self.host = lab, host
        self.src, self.dst, self.dport = src, dst, dport
        self.sport = sport or random.randint(*PORTS)
        self.v6 = ":" in dst
        self.window = window
        self.iss = random.randint(0, _MASK)
        self.snd_nxt = self.iss
        self.rcv_nxt: int | None = None  # the peer's next byte, once its SYN came
        self.peer_isn: int | None = None
        self.acked = self.iss  # the highest ack the peer sent
        self.received: list[Received] = []
        self.data = bytearray()  # the peer's bytes, in order
        self.fin = False          # the peer's FIN arrived in order
        self.reset = False        # a RST arrived
        self.auto_ack = True
        self._want_ts = timestamps
        self.timestamps = False   # agreed in the handshake
        self._ts_base = random.randint(1, 1 << 30)
        self._ts_start = time.monotonic()
        self.ts_recent = 0        # the peer's last TSval
        self._read = 0            # how much of `data` reply()/read_line() consumed
        self._cond = threading.Condition()
        self._silence = silence
        self._stack: list[Any] = []
        self._rx: socket.socket | None = None
        self._tx: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = False

    def __repr__(self) -> str:
        return f"RawTCP([{self.src}]:{self.sport} > [{self.dst}]:{self.dport})"

    # -- open and close --------------------------------------------------------

    def __enter__(self) -> RawTCP:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._silence:
            ctx = silence_kernel(self.lab, self.host, self.src, self.sport)
            ctx.__enter__()
            self._stack.append(ctx)
        family = socket.AF_INET6 if self.v6 else socket.AF_INET
        with self.lab.inside(self.host):
            self._tx = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        self._tx.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        self._rx.settimeout(_POLL)
        self._thread = threading.Thread(target=self._receive, name=repr(self), daemon=True)
        self._thread.start()

    def close(self, reset: bool = True) -> None:
        """Stop; with `reset`, first send the peer a RST at snd_nxt so that it
        frees the connection at once (unless it is reset already)."""
        try:
            if reset and self.peer_isn is not None and not self.reset and self._tx is not None:
                self.send(flags="R", ack=0, advance=False)
        finally:
            self._stop = True
            if self._thread is not None:
                self._thread.join()
            for sock in (self._rx, self._tx):
                if sock is not None:
                    sock.close()
            while self._stack:
                self._stack.pop().__exit__(None, None, None)

    # -- sending ------------------------------------------------------------------

    def build(self, payload: bytes = b"", *, flags: str = "PA", seq: int | None = None,
              ack: int | None = None, window: int | None = None, urg: int = 0,
              ttl: int | None = None, options: Sequence[tuple] | None = None,
              tsval: int | None = None, ext: Sequence[Packet] = (),
              ip_options: Sequence[Packet] = ()) -> Packet:
        """The packet for a segment (scapy): defaults are the connection's
        next seq, its ack of the peer's bytes, and its window.

        `urg` is the urgent pointer (set "U" in `flags` too, or not: the
        pointer goes out either way); `ttl` is the TTL or hop limit; `ext`
        are IPv6 extension headers before TCP, `ip_options` IPv4 options.
        """
        if ack is None:
            ack = self.rcv_nxt or 0
        if "A" not in flags and ack == self.rcv_nxt:
            ack = 0
        opts = list(options or [])
        if self.timestamps and not any(o[0] == "Timestamp" for o in opts):
            opts.append(("Timestamp", (self.tsval() if tsval is None else tsval, self.ts_recent)))
        tcp = TCP(sport=self.sport, dport=self.dport, seq=(self.snd_nxt if seq is None else seq) & _MASK,
                  ack=ack & _MASK, flags=flags, window=self.window if window is None else window,
                  urgptr=urg, options=opts)
        if self.v6:
            ip: Packet = IPv6(src=self.src, dst=self.dst, **({"hlim": ttl} if ttl is not None else {}))
            for header in ext:
                ip = ip / header
        else:
            ip = IP(src=self.src, dst=self.dst, options=list(ip_options),
                    **({"ttl": ttl} if ttl is not None else {}))
        return ip / tcp / payload

    def send(self, payload: bytes = b"", *, flags: str = "PA", seq: int | None = None,
             advance: bool | None = None, fragment_size: int | None = None, **build: Any) -> bytes:
        """Build and send a segment; returns its bytes.

        It goes at `seq` (default snd_nxt); `advance` (default: when seq is
        snd_nxt) moves snd_nxt past it. `fragment_size` sends it as IP
        fragments of that many bytes of payload each (IPv6: a fragment
        header is added).
        """
        at = self.snd_nxt if seq is None else seq
        if fragment_size is not None and self.v6:
            build["ext"] = [*build.get("ext", ()), IPv6ExtHdrFragment()]
        pkt = self.build(payload, flags=flags, seq=at, **build)
        raw = bytes(pkt)
        if fragment_size is None:
            self.send_raw(raw)
        elif self.v6:
            # fragment6 takes the size of a whole fragment: the headers up to
            # and including the fragment header, then the piece
            headers = len(raw) - len(pkt[IPv6ExtHdrFragment].payload)
            for piece in fragment6(pkt, headers + fragment_size):
                self.send_raw(bytes(piece))
        else:
            for piece in fragment(pkt, fragment_size):
                self.send_raw(bytes(piece))
        if advance or (advance is None and (at - self.snd_nxt) & _MASK == 0):
            self.snd_nxt = (at + len(payload) + ("S" in flags) + ("F" in flags)) & _MASK
        return raw

    def send_raw(self, packet: bytes) -> None:
        """Send IP packet bytes exactly as given."""
        assert self._tx is not None, "not open"
        if packet[0] >> 4 == 6:
            self._tx.sendto(packet, (socket.inet_ntop(socket.AF_INET6, packet[24:40]), 0, 0, 0))
        else:
            self._tx.sendto(packet, (socket.inet_ntop(socket.AF_INET, packet[16:20]), 0))

    def tsval(self) -> int:
        """Our TCP timestamp now: milliseconds, from a random base."""
        return (self._ts_base + int((time.monotonic() - self._ts_start) * 1000)) & _MASK

    def connect(self, payload: bytes = b"", *, timeout: float = TIMEOUT,
                options: Sequence[tuple] | None = None) -> None:
        """The three-way handshake; `payload` rides on the SYN."""
        opts = list(options if options is not None else [("MSS", 1400)])
        if self._want_ts:
            opts += [("NOP", None), ("NOP", None), ("Timestamp", (self.tsval(), 0))]
        self.send(payload, flags="S", ack=0, options=opts)
        self.wait(lambda: self.peer_isn is not None, timeout, "the SYN-ACK")
        self.send(flags="A")

    # -- receiving ----------------------------------------------------------------

    def wait(self, condition: Callable[[], object], timeout: float = TIMEOUT,
             what: str = "the peer") -> Any:
        """Wait until `condition()` is true (checked whenever a segment
        arrives); its value, or AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = condition()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self}: no {what} within {timeout} s; received "
                                         f"{self.received!r}")
                self._cond.wait(min(left, _POLL))

    def settle(self, quiet: float = 0.3, timeout: float = TIMEOUT) -> None:
        """Wait until nothing has arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            last = self.received[-1].time if self.received else 0.0
            if time.monotonic() - last >= quiet:
                return
            time.sleep(quiet / 3)

    def read_line(self, timeout: float = TIMEOUT) -> bytes:
        """The peer's next line, with its line ending."""
        def line() -> bytes | None:
            end = self.data.find(b"\n", self._read)
            if end < 0:
                return None
            out = bytes(self.data[self._read:end + 1])
            self._read = end + 1
            return out
        return self.wait(line, timeout, "line")

    def reply(self, timeout: float = TIMEOUT) -> bytes:
        """The next whole SMTP reply (every line up to the one with a space
        after the code)."""
        lines = [self.read_line(timeout)]
        while lines[-1][3:4] == b"-":
            lines.append(self.read_line(timeout))
        return b"".join(lines)

    def unread(self) -> bytes:
        """The peer's bytes that reply() and read_line() have not consumed yet."""
        with self._cond:
            return bytes(self.data[self._read:])

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """Wait until the peer closed (FIN) or reset the connection."""
        return bool(self.wait(lambda: self.fin or self.reset, timeout, "FIN or RST"))

    def _receive(self) -> None:
        assert self._rx is not None
        while not self._stop:
            try:
                frame, addr = self._rx.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] != _PACKET_HOST or len(frame) < 15:
                continue
            layer = _ETHERTYPES.get(int.from_bytes(frame[12:14], "big"))
            if layer is None:
                continue
            try:
                pkt = layer(frame[14:])
            except Exception:  # a frame scapy cannot read is not ours
                continue
            tcp = pkt.getlayer(TCP)
            if (tcp is None or pkt.src != self.dst or pkt.dst != self.src
                    or tcp.sport != self.dport or tcp.dport != self.sport):
                continue
            self._segment(tcp)

    def _segment(self, tcp: TCP) -> None:
        flags = str(tcp.flags)
        payload = bytes(tcp.payload)
        with self._cond:
            self.received.append(Received(tcp.seq, tcp.ack, flags, payload, tcp.window,
                                          time.monotonic()))
            for name, value in tcp.options:
                if name == "Timestamp":
                    self.ts_recent = value[0]
                    if "S" in flags:
                        self.timestamps = self._want_ts
            if "A" in flags and 0 < (tcp.ack - self.acked) & _MASK < 1 << 31:
                self.acked = tcp.ack
            answer = False
            if "R" in flags:
                self.reset = True
            elif "S" in flags:
                if self.peer_isn is None:
                    self.peer_isn = tcp.seq
                    self.rcv_nxt = (tcp.seq + 1) & _MASK
                else:
                    answer = True  # a resent SYN-ACK: our ACK was lost
            elif self.rcv_nxt is not None:
                if tcp.seq == self.rcv_nxt and (payload or "F" in flags):
                    self.data += payload
                    self.rcv_nxt = (self.rcv_nxt + len(payload) + ("F" in flags)) & _MASK
                    self.fin = self.fin or "F" in flags
                    answer = True
                elif payload and (self.rcv_nxt - tcp.seq) & _MASK < 1 << 31:
                    answer = True  # a resend of what we have: ack it again
            self._cond.notify_all()
        if answer and self.auto_ack and not self._stop:
            try:
                self.send(flags="A", advance=False)
            except OSError:
                pass

