"""What runs on a lab host through `lab.run` only, so that it works alike on a
namespace `Lab` and on a `VagrantLab`: provisioning scripts, and log files
read from a byte offset on."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import PurePath, PurePosixPath
from typing import Any, TypeVar

from sapd_nfq.lab.topology import LabError

T = TypeVar("T")
_POLL = 0.05


def run_script(lab: Any, host: Any, script: PurePath, args: Sequence[str],
               env: Sequence[str] = ()) -> None:
    """Run a provisioning script on `host`; LabError with its output if it fails."""
    argv = ["env", *env, str(script), *args] if env else [str(script), *args]
    done = lab.run(host, argv, check=False, stdin=subprocess.DEVNULL,
                   capture_output=True, text=True)
    if done.returncode:
        raise LabError(f"{script.name} {args[0]} failed ({done.returncode}): "
                       f"{(done.stdout + done.stderr).strip()}")


class HostLog:
    """A log file on a lab host. With `missing_ok`, a file not written yet
    reads as empty (Postfix creates its log with the first line)."""

    def __init__(self, lab: Any, host: Any, path: PurePosixPath, *, missing_ok: bool = False
                 ) -> None:
        self.lab, self.host, self.path, self.missing_ok = lab, host, path, missing_ok

    def size(self) -> int:
        """The log's length in bytes: an offset for `since` and `wait_for`."""
        return len(self._read(0))

    def since(self, offset: int) -> list[str]:
        """The log's lines from byte `offset` on."""
        return self._read(offset).decode(errors="replace").splitlines()

    def wait_for(self, found: Callable[[list[str]], T | None], since: int, timeout: float,
                 complaint: str) -> T:
        """Poll the lines after byte `since` until `found(lines)` is not None, and
        return that; LabError saying `complaint` and the lines after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.since(since)
            result = found(lines)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                raise LabError(f"{complaint} within {timeout}s; since then:\n" + "\n".join(lines))
            time.sleep(_POLL)

    def _read(self, offset: int) -> bytes:
        done = self.lab.run(self.host, ["tail", "-c", f"+{offset + 1}", str(self.path)],
                            check=False, capture_output=True)
        if done.returncode == 0:
            output: bytes = done.stdout
            return output
        if self.missing_ok:
            return b""
        raise LabError(f"cannot read {self.path}: {done.stderr.decode(errors='replace')}")
