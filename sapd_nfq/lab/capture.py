"""Packet captures inside the lab with tcpdump."""

from __future__ import annotations

import io
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # the lab's topology needs pyroute2: loaded by whoever builds a lab
    from sapd_nfq.lab.topology import Host, Lab

MAIL_FILTER = "tcp port 25 or tcp port 110 or tcp port 143"
START_TIMEOUT = 5.0  # seconds for tcpdump to open the interface
SETTLE = 0.3  # seconds to let the last FIN/ACKs arrive before stopping


@contextmanager
def capture(lab: Lab, host: Host | str, path: Path, bpf: str = MAIL_FILTER,
            ifname: str | None = None) -> Iterator[Path]:
    """Record full packets on one of the host's interfaces (default: its first) to `path`.

    The block runs once tcpdump is listening; on exit the capture is closed
    after SETTLE seconds, so connection teardowns are included.
    """
    host = lab.host(host)
    argv = ["tcpdump", "-i", ifname or host.ifnames[0], "-n", "-s", "0", "-U",
            # Without immediate mode packets wait in the kernel ring for up to a second
            # and are lost when tcpdump is stopped before then.
            "--immediate-mode",
            "-Z", "root",  # write as root: Debian's tcpdump would drop to its own user
            "-w", str(path), bpf]
    proc = lab.spawn(host, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_listening(proc)
        yield path
        time.sleep(SETTLE)
    finally:
        lab.stop(proc, signal.SIGINT)
        _stderr(proc).close()


def _stderr(proc: subprocess.Popen[Any]) -> io.BufferedReader:
    """The pipe tcpdump writes its messages to (spawned with stderr=PIPE, in binary)."""
    return cast(io.BufferedReader, proc.stderr)


def _wait_listening(proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    seen = b""
    while b"listening on" not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or proc.poll() is not None:
            from sapd_nfq.lab.topology import LabError

            raise LabError(f"tcpdump did not start: {seen.decode(errors='replace').strip()}")
        if select.select([_stderr(proc)], [], [], remaining)[0]:
            chunk = _stderr(proc).read1(4096)
            if not chunk:
                continue
            seen += chunk
