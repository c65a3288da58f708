"""When a changed config file or table is due for a reload: a pure debounce rule.

A file is read only once its stamp has held still: a program that rewrites it
in place can be caught between two writes.
"""

from __future__ import annotations

import os
from pathlib import Path

#: how often the worker looks at the watched files
WATCH_INTERVAL = 2.0
#: a changed file is read only once its stamp has held still this long: a
#: program that rewrites it in place can be caught between two writes
SETTLE_INTERVAL = WATCH_INTERVAL


#: the stamps of the watched files, in their order (None: a file that is not there)
Stamps = tuple[tuple[int, int, int] | None, ...]


def stamp(path: str | Path) -> tuple[int, int, int] | None:
    """What tells that a file changed: the mtime alone misses a second write
    within the same clock tick (an editor's truncate, then write)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class FileWatch:
    """When a change to the watched files is due for a reload.

    `seen` holds the stamps the running config and table were read from.
    Other stamps are due once they have stayed the same for the wait
    (SETTLE_INTERVAL, or longer after `hold`); any new change starts over.
    """

    def __init__(self, seen: Stamps) -> None:
        self.seen = seen
        self._pending: Stamps | None = None
        self._since = 0.0
        self._wait = SETTLE_INTERVAL

    def due(self, stamps: Stamps, now: float) -> float | None:
        """Seconds the changed `stamps` have held still, once due; else None."""
        if stamps == self.seen:
            self._pending = None
            return None
        if stamps != self._pending:
            self._pending, self._since, self._wait = stamps, now, SETTLE_INTERVAL
            return None
        held = now - self._since
        return held if held >= self._wait else None

    def hold(self, seconds: float) -> None:
        """Let the pending change wait until it has held still `seconds`."""
        self._wait = seconds
