"""What the benchmark's own servers share: serving until told to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any


async def serve_until_stopped(name: str, servers: list[asyncio.AbstractServer]) -> None:
    """Say which ports `servers` (SMTP, POP3) listen on, then serve until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    print(f"{name} listening: smtp {ports[0]}, pop3 {ports[1]}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def run(main: Callable[[Any], Awaitable[None]], args: Any) -> int:
    """Run a server's async main with room for many connections."""
    from .load import raise_fd_limit

    raise_fd_limit()
    asyncio.run(main(args))
    return 0
