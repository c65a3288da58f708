"""The client side of each workload, run inside the lab's client namespace.

Each subcommand prints one JSON object (the raw figures) on stdout:

    pop3      log in, RETR every message, QUIT: bytes and seconds
    upload    log in by POP3, then SMTP messages of --size bytes: bytes and seconds
    sessions  short SMTP sessions (EHLO, MAIL, RCPT, QUIT) at a fixed concurrency
              for --duration seconds: sessions/s and per-command round trips;
              --relay-attempts: each one a relay attempt the gate refuses
    hold      open SMTP sessions and keep them open, on command from stdin
              ("open N" -> {"open": N, ...}; "quit" or EOF -> close all)

Clients are plain sockets, blocking for the bulk workloads and one epoll loop
for the session load, so the client costs little next to the path measured.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import math
import resource
import selectors
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterable

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
RECV_SIZE = 1 << 20
LINE = b"x" * 78 + b"\r\n"  # message text: 80-byte lines, none starts with a dot
TIMEOUT = 60.0

SENDER = "sender@external.example"
LOCAL_RECIPIENT = "alice@lab.example"
SESSION_SCRIPT = (
    b"EHLO client.lab.example\r\n",
    f"MAIL FROM:<{SENDER}>\r\n".encode(),
    f"RCPT TO:<{LOCAL_RECIPIENT}>\r\n".encode(),
    b"QUIT\r\n",
)
SESSION_COMMANDS = ("EHLO", "MAIL", "RCPT", "QUIT")
#: the reply each step waits for: the greeting, then one per command
SESSION_EXPECT = (b"220", b"250", b"250", b"250", b"221")
#: a relay attempt from an address that never logged in: a local sender, an external
#: recipient (row 3 of the table), refused at RCPT
RELAY_SCRIPT = (
    b"EHLO client.lab.example\r\n",
    f"MAIL FROM:<{LOCAL_RECIPIENT}>\r\n".encode(),
    b"RCPT TO:<dave@external.example>\r\n",
    b"QUIT\r\n",
)
RELAY_EXPECT = (b"220", b"250", b"250", b"5", b"221")
#: the step after which a relay attempt has been refused: a gate that ends the whole
#: session (RST) rather than the recipient alone closes it here
RELAY_REFUSED = 4


class BenchError(RuntimeError):
    """A workload could not run as planned (refused, unexpected reply, timeout)."""


def raise_fd_limit(want: int = 65536) -> None:
    """Allow `want` open files (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentiles(samples: list[float], points: Iterable[float] = (50, 99)) -> dict[str, float]:
    """Nearest-rank percentiles in milliseconds, plus the sample count."""
    ordered = sorted(samples)
    out: dict[str, float] = {"n": len(ordered)}
    for p in points:
        if ordered:
            rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
            out[f"p{p:g}_ms"] = round(ordered[rank] * 1000, 4)
    return out


# --- blocking clients for the bulk workloads ----------------------------------------

class LineClient:
    """A blocking connection that reads replies line by line."""

    def __init__(self, server: str, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection((server, port), TIMEOUT,
                                             source_address=(source, 0) if source else None)
        self.buf = b""

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise BenchError(f"connection closed; partial reply {self.buf[:200]!r}")
            self.buf += chunk
        line, self.buf = self.buf[:end + 1], self.buf[end + 1:]
        return line

    def reply(self) -> bytes:
        """One SMTP reply, multi-line included; returns its last line."""
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return line

    def command(self, text: bytes, expect: bytes, smtp: bool = True) -> bytes:
        if text:
            self.sock.sendall(text)
        line = self.reply() if smtp else self.line()
        if not line.startswith(expect):
            raise BenchError(f"{text.split(b' ')[0].strip()!r} answered {line.strip()[:200]!r}")
        return line

    def close(self) -> None:
        self.sock.close()


def pop3_login(client: LineClient, user: str, password: str) -> None:
    client.command(b"", b"+OK", smtp=False)
    client.command(f"USER {user}\r\n".encode(), b"+OK", smtp=False)
    client.command(f"PASS {password}\r\n".encode(), b"+OK", smtp=False)


def pop3_retrieve(server: str, port: int, user: str, password: str) -> dict:
    """Log in, RETR every message one after another, QUIT."""
    client = LineClient(server, port)
    try:
        pop3_login(client, user, password)
        count = int(client.command(b"STAT\r\n", b"+OK", smtp=False).split()[1])
        if count == 0:
            raise BenchError(f"mailbox of {user} is empty")
        sock, buf = client.sock, bytearray(RECV_SIZE)
        total = 0
        started = time.perf_counter()
        for index in range(1, count + 1):
            sock.sendall(b"RETR %d\r\n" % index)
            n = sock.recv_into(buf)
            if not buf.startswith(b"+OK"):
                raise BenchError(f"RETR {index} answered {bytes(buf[:min(n, 80)])!r}")
            tail = b""
            while True:
                if not n:
                    raise BenchError(f"connection closed during RETR {index}")
                total += n
                tail = (tail + bytes(buf[max(0, n - 5):n]))[-5:]
                if tail.endswith(b"\r\n.\r\n"):
                    break
                n = sock.recv_into(buf)
        seconds = time.perf_counter() - started
        client.command(b"QUIT\r\n", b"+OK", smtp=False)
    finally:
        client.close()
    return {"bytes": total, "seconds": seconds, "messages": count}


def message_text(size: int) -> bytes:
    """A message of exactly `size` bytes of text plus the final dot line."""
    head = b"From: <alice@lab.example>\r\nTo: <dave@external.example>\r\nSubject: bulk\r\n\r\n"
    lines = (size - len(head)) // len(LINE)
    body = head + LINE * lines
    return body + b"y" * (size - len(body) - 2) + b"\r\n" + b".\r\n"


def smtp_upload(server: str, port: int, count: int, size: int, sender: str, recipient: str,
                pop3_port: int | None, user: str | None, password: str | None) -> dict:
    """POP3 login (when asked), then `count` messages of `size` bytes on one SMTP session.

    The time of a message runs from its first text byte to the server's reply
    to the final dot: the reply comes once the MTA has queued the message.
    """
    if pop3_port:
        pop = LineClient(server, pop3_port)
        pop3_login(pop, user or "", password or "")
        pop.command(b"QUIT\r\n", b"+OK", smtp=False)
        pop.close()
    text = message_text(size)
    client = LineClient(server, port)
    times = []
    try:
        client.command(b"", b"220")
        client.command(b"EHLO client.lab.example\r\n", b"250")
        for _ in range(count):
            client.command(f"MAIL FROM:<{sender}>\r\n".encode(), b"250")
            client.command(f"RCPT TO:<{recipient}>\r\n".encode(), b"250")
            client.command(b"DATA\r\n", b"354")
            started = time.perf_counter()
            client.sock.sendall(text)
            client.command(b"", b"250")
            times.append(time.perf_counter() - started)
        client.command(b"QUIT\r\n", b"221")
    finally:
        client.close()
    return {"bytes": size * count, "seconds": sum(times), "messages": count,
            "per_message_s": [round(t, 4) for t in times]}


# --- the short-session load ------------------------------------------------------------

class _Session:
    __slots__ = ("sock", "step", "sent", "buf", "started")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.step = 0
        self.sent = now
        self.started = now
        self.buf = b""


def _final_reply(buf: bytes) -> bool:
    """Whether buf ends with the last line of an SMTP reply."""
    if not buf.endswith(b"\n"):
        return False
    start = buf.rfind(b"\n", 0, len(buf) - 1) + 1
    return buf[start + 3:start + 4] != b"-"


def _connect(server: str, port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    code = sock.connect_ex((server, port))
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(code, f"connect: {errno.errorcode.get(code, code)}")
    return sock


def run_sessions(server: str, port: int, sources: list[str], concurrency: int,
                 duration: float, warmup: float = 1.0, timeout: float = 10.0,
                 relay: bool = False) -> dict:
    """Keep `concurrency` sessions going for warmup + duration seconds.

    Sessions that complete inside the measured window count; round trips are
    sampled there too: "connect" from connect() to the greeting (the handshake
    included), "command" from sending a command to the end of its reply.
    With `relay`, each session is a relay attempt, complete once refused.
    """
    script, expect = (RELAY_SCRIPT, RELAY_EXPECT) if relay else (SESSION_SCRIPT, SESSION_EXPECT)
    ended = RELAY_REFUSED if relay else len(expect)
    sel = selectors.EpollSelector()
    source = itertools.cycle(sources)
    errors: Counter[str] = Counter()
    connect_rtt: list[float] = []
    command_rtt: list[list[float]] = [[] for _ in script]
    completed = 0
    total = 0  # warm-up and stragglers included: what the path carried in all
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + duration
    active: dict[int, _Session] = {}

    def start(now: float) -> None:
        try:
            sock = _connect(server, port, next(source))
        except OSError as exc:
            errors[f"connect: {exc.strerror or exc}"] += 1
            return
        session = _Session(sock, now)
        active[sock.fileno()] = session
        sel.register(sock, selectors.EVENT_READ, session)

    def finish(session: _Session, error: str | None) -> None:
        sel.unregister(session.sock)
        del active[session.sock.fileno()]
        session.sock.close()
        if error:
            errors[error] += 1

    def readable(session: _Session, now: float) -> bool:
        """Advance one session; True when it is over (and a new one may start)."""
        nonlocal completed, total
        try:
            data = session.sock.recv(65536)
        except OSError as exc:
            data, error = b"", type(exc).__name__
        else:
            error = f"closed before reply {session.step}"
        if not data:
            if session.step >= ended:
                finish(session, None)
                completed += measure_from <= now <= stop_at
                total += 1
            else:
                finish(session, error)
            return True
        session.buf += data
        if not _final_reply(session.buf):
            return False
        step = session.step
        if not session.buf.startswith(expect[step]):
            finish(session, f"{expect[step].decode()} expected, got "
                            f"{session.buf[:3].decode(errors='replace')}")
            return True
        if measure_from <= now <= stop_at:
            (connect_rtt if step == 0 else command_rtt[step - 1]).append(now - session.sent)
        session.buf = b""
        session.step += 1
        if session.step < len(expect):
            try:
                session.sock.send(script[step])
            except OSError:  # reset by a gate that ends the session at the refusal
                pass
            session.sent = now
        return False  # after the last reply: wait for the server to close

    for _ in range(concurrency):
        start(begin)
    next_sweep = begin + 0.5
    while True:
        now = time.perf_counter()
        if now >= stop_at and not active:
            break
        if now >= stop_at + timeout:
            for session in list(active.values()):
                finish(session, None)  # in flight at the end: not counted either way
            break
        for key, _ in sel.select(0.1):
            now = time.perf_counter()
            if readable(key.data, now) and now < stop_at:
                start(now)
        if now >= next_sweep:
            next_sweep = now + 0.5
            for session in [s for s in active.values() if now - s.started > timeout]:
                finish(session, "timeout")
                if now < stop_at:
                    start(now)
    sel.close()
    pooled = [t for samples in command_rtt for t in samples]
    return {
        "concurrency": concurrency, "sources": len(sources), "seconds": duration,
        "sessions": completed, "sessions_per_s": round(completed / duration, 1),
        "sessions_total": total,
        "connect": percentiles(connect_rtt),
        "command": percentiles(pooled),
        "per_command": {name: percentiles(samples)
                        for name, samples in zip(SESSION_COMMANDS, command_rtt)},
        "errors": dict(errors),
    }


# --- holding sessions open (the memory workload) -----------------------------------------

def open_sessions(server: str, port: int, sources: list[str], want: int, held: list[socket.socket],
                  in_flight: int = 256, timeout: float = 30.0) -> dict:
    """Open sessions until `want` are held, each greeted and past its EHLO."""
    sel = selectors.EpollSelector()
    source = itertools.cycle(sources)
    errors: Counter[str] = Counter()
    pending: dict[int, list] = {}
    deadline = time.monotonic() + timeout
    while len(held) < want and time.monotonic() < deadline:
        while len(pending) < in_flight and len(held) + len(pending) < want:
            sock = _connect(server, port, next(source))
            pending[sock.fileno()] = [sock, 0, b""]
            sel.register(sock, selectors.EVENT_READ)
        for key, _ in sel.select(0.5):
            state = pending[key.fd]
            sock = state[0]
            try:
                data = sock.recv(65536)
            except OSError as exc:
                data, error = b"", type(exc).__name__
            else:
                error = "closed"
            if not data:
                sel.unregister(sock)
                del pending[key.fd]
                sock.close()
                errors[error] += 1
                continue
            state[2] += data
            if not _final_reply(state[2]):
                continue
            state[2] = b""
            if state[1] == 0:
                state[1] = 1
                sock.send(SESSION_SCRIPT[0])
            else:
                sel.unregister(sock)
                del pending[key.fd]
                held.append(sock)
    for state in pending.values():
        state[0].close()
    sel.close()
    return {"open": len(held), "errors": dict(errors)}


def hold(server: str, port: int, sources: list[str]) -> None:
    held: list[socket.socket] = []
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["open"]:
            print(json.dumps(open_sessions(server, port, sources, int(words[1]), held)), flush=True)
        elif words[:1] == ["quit"]:
            break
    for sock in held:
        sock.close()


# --- command line ---------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="workload", required=True)
    pop3 = sub.add_parser("pop3")
    upload = sub.add_parser("upload")
    sessions = sub.add_parser("sessions")
    hold_ = sub.add_parser("hold")
    for p in (pop3, upload, sessions, hold_):
        p.add_argument("--server", required=True)
        p.add_argument("--port", type=int, required=True)
    for p in (pop3, upload):
        p.add_argument("--user", help="a lab POP3 user (password from the lab's users file)")
    upload.add_argument("--pop3-port", type=int, help="log in by POP3 on this port first")
    upload.add_argument("--count", type=int, default=3)
    upload.add_argument("--size", type=int, default=10_000_000)
    upload.add_argument("--sender", default="alice@lab.example")
    upload.add_argument("--recipient", default="dave@external.example")
    for p in (sessions, hold_):
        p.add_argument("--sources", required=True, help="comma-separated client addresses")
    sessions.add_argument("--concurrency", type=int, default=1)
    sessions.add_argument("--duration", type=float, default=5.0)
    sessions.add_argument("--warmup", type=float, default=1.0)
    sessions.add_argument("--relay-attempts", action="store_true",
                          help="each session tries to relay (local sender, external recipient) "
                               "and is complete once refused")
    return parser.parse_args(argv)


def _password(user: str | None) -> str | None:
    from sapd_nfq.lab.mail import lab_users

    return lab_users()[user] if user else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        return _run(args)
    except (OSError, BenchError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.workload == "hold":
        hold(args.server, args.port, args.sources.split(","))
        return 0
    if args.workload == "pop3":
        result = pop3_retrieve(args.server, args.port, args.user, _password(args.user))
    elif args.workload == "upload":
        result = smtp_upload(args.server, args.port, args.count, args.size, args.sender,
                             args.recipient, args.pop3_port, args.user, _password(args.user))
    else:
        result = run_sessions(args.server, args.port, args.sources.split(","), args.concurrency,
                              args.duration, args.warmup, relay=args.relay_attempts)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
