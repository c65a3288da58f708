"""A fast SMTP and POP3 responder: answers every command at once, stores nothing.

The short-session benchmark measures the path between client and server, so
the server must cost as little as possible: this one answers from constant
strings, pipelined commands with one write, and closes after QUIT the way an
MTA does (server first, so the client side keeps no TIME_WAIT). SMTP
accepts any envelope and swallows message text up to the final dot. POP3
accepts any login and serves `messages` synthetic messages of `size` bytes.

    python -m bench.responder --host 198.18.2.2 --smtp-port 2525 --pop3-port 2110
"""

from __future__ import annotations

import argparse
import asyncio

from . import serving
from .serving import serve_until_stopped

MAX_LINE = 4096  # a longer line is answered with an error and dropped

_SMTP_GREETING = b"220 responder.lab.example ESMTP\r\n"
_SMTP_EHLO = (b"250-responder.lab.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
              b"250 SIZE 104857600\r\n")
_SMTP_OK = b"250 2.0.0 OK\r\n"
_SMTP_DATA = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_SMTP_QUEUED = b"250 2.0.0 Queued\r\n"
_SMTP_BYE = b"221 2.0.0 Bye\r\n"
_SMTP_UNKNOWN = b"502 5.5.2 Command not recognised\r\n"
_SMTP_TOO_LONG = b"500 5.5.2 Line too long\r\n"
_SMTP_REPLIES = {
    b"HELO": b"250 responder.lab.example\r\n", b"EHLO": _SMTP_EHLO, b"MAIL": _SMTP_OK,
    b"RCPT": _SMTP_OK, b"RSET": _SMTP_OK, b"NOOP": _SMTP_OK, b"VRFY": b"252 2.0.0 Maybe\r\n",
}
_END_OF_DATA = b"\r\n.\r\n"


class SMTPResponder(asyncio.Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""
        # In message text: the last bytes seen, so the final dot is found across reads.
        # A message starts after the DATA line's CRLF.
        self.tail: bytes | None = None
        transport.write(_SMTP_GREETING)

    def data_received(self, data: bytes) -> None:
        out = []
        if self.tail is not None:
            data = self._message(data, out)
        buffer = self.buffer + data
        start = 0
        while self.tail is None:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            verb = buffer[start:start + 4].upper()
            start = end + 1
            if verb == b"QUIT":
                out.append(_SMTP_BYE)
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            if verb == b"DATA":
                out.append(_SMTP_DATA)
                self.tail = b"\r\n"
                rest = self._message(buffer[start:], out)
                buffer, start = rest, 0
            else:
                out.append(_SMTP_REPLIES.get(verb, _SMTP_UNKNOWN))
        self.buffer = buffer[start:]
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            out.append(_SMTP_TOO_LONG)
        if out:
            self.transport.write(b"".join(out))

    def _message(self, data: bytes, out: list[bytes]) -> bytes:
        """Swallow message text; returns the bytes after the final dot, if any."""
        window = self.tail + data
        end = window.find(_END_OF_DATA)
        if end < 0:
            self.tail = window[-4:]
            return b""
        self.tail = None
        out.append(_SMTP_QUEUED)
        return window[end + len(_END_OF_DATA):]


def pop3_message(index: int, size: int) -> bytes:
    """Message `index` of the synthetic mailbox: `size` bytes, CRLF lines, no line a dot."""
    head = f"Subject: message {index}\r\n\r\n".encode()
    line = b"x" * 78 + b"\r\n"
    body = line * ((size - len(head)) // len(line) + 1)
    return head + body[:size - len(head) - 2] + b"\r\n"


class POP3Responder(asyncio.Protocol):
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.buffer = b""
        transport.write(b"+OK responder POP3 ready\r\n")

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        start = 0
        out: list[bytes] = []
        while (end := buffer.find(b"\n", start)) >= 0:
            words = buffer[start:end].split()
            start = end + 1
            verb = words[0].upper() if words else b""
            if verb == b"QUIT":
                out.append(b"+OK bye\r\n")
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            out.append(self._reply(verb, words[1:]))
        self.buffer = buffer[start:]
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            out.append(b"-ERR line too long\r\n")
        if out:
            self.transport.write(b"".join(out))

    def _reply(self, verb: bytes, args: list[bytes]) -> bytes:
        messages = self.messages
        if verb in (b"USER", b"PASS", b"NOOP", b"RSET"):
            return b"+OK\r\n"
        if verb == b"CAPA":
            return b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n"
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (len(messages), sum(map(len, messages)))
        if verb == b"LIST":
            listing = b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(messages, 1))
            return b"+OK\r\n" + listing + b".\r\n"
        if verb == b"RETR" and args and args[0].isdigit() and 0 < int(args[0]) <= len(messages):
            message = messages[int(args[0]) - 1]
            return b"+OK %d octets\r\n" % len(message) + message + b".\r\n"
        return b"-ERR unknown command or message\r\n"


async def serve(host: str, smtp_port: int, pop3_port: int, messages: int = 4,
                size: int = 4096) -> list[asyncio.Server]:
    """Start both listeners (port 0: any free port); returns the servers."""
    loop = asyncio.get_running_loop()
    mailbox = [pop3_message(i, size) for i in range(1, messages + 1)]
    return [
        await loop.create_server(SMTPResponder, host, smtp_port, backlog=4096),
        await loop.create_server(lambda: POP3Responder(mailbox), host, pop3_port, backlog=4096),
    ]


async def _main(args: argparse.Namespace) -> None:
    servers = await serve(args.host, args.smtp_port, args.pop3_port, args.messages, args.size)
    await serve_until_stopped("responder", servers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.responder", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=2525)
    parser.add_argument("--pop3-port", type=int, default=2110)
    parser.add_argument("--messages", type=int, default=4, help="POP3 mailbox size in messages")
    parser.add_argument("--size", type=int, default=4096, help="bytes per POP3 message")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return serving.run(_main, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
