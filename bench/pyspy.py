"""The daemon's profile under a workload, by py-spy, and the top of it.

`python -m bench --profile DIR` records the sapd-nfq daemon with
`py-spy record --nonblocking --rate 200 --format raw --pid PID` (py-spy from
PyPI, as root) for the length of each profiled workload, into
DIR/<workload>.txt: one line per distinct stack, `frame;frame;... count`, the
innermost frame last. `python -m bench.pyspy FILE [--top N]` prints where the
samples fall: by function including what it calls, and by the line that was
running (self). --nonblocking reads the process without stopping it, so the
profile does not slow what it measures; a sample may then show a stack that
was changing, which is rare and only blurs the least common entries.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

RATE = 200
#: "function (path/to/file.py:123)"; py-spy names a frame without a line as "function (file)"
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^():]+)(?::(?P<line>\d+))?\)$")


def binary() -> str:
    """py-spy's path: beside this Python (the venv's), or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (pip install '.[bench]')")
    return found


@contextmanager
def recording(pid: int, out: Path) -> Iterator[None]:
    """py-spy samples `pid` while the body runs; the profile is in `out` after."""
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([binary(), "record", "--nonblocking", "--rate", str(RATE), "--format", "raw",
                             "--pid", str(pid), "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        _, err = proc.communicate(timeout=60)
        if not out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.strip()[-500:]}")


@dataclass(frozen=True)
class Top:
    samples: int
    #: samples in which the function is on the stack (counted once a sample)
    inclusive: list[tuple[str, int]]
    #: samples in which the line was the innermost frame
    own: list[tuple[str, int]]


def _where(frame: str, with_line: bool) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name = Path(match["file"]).name
    where = f"{match['function']} ({name}"
    return where + (f":{match['line']})" if with_line and match["line"] else ")")


def top(text: str, n: int = 15) -> Top:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        samples += k
        frames = stack.split(";")
        for function in {_where(f, with_line=False) for f in frames}:
            inclusive[function] += k
        own[_where(frames[-1], with_line=True)] += k
    return Top(samples, inclusive.most_common(n), own.most_common(n))


def format_top(result: Top) -> str:
    def rows(entries: list[tuple[str, int]]) -> list[str]:
        return [f"| {100 * k / result.samples:5.1f}% | `{name}` |" for name, k in entries]

    return "\n".join([f"{result.samples} samples at {RATE}/s", "",
                      "| samples | function, with what it calls |", "|---:|---|",
                      *rows(result.inclusive), "",
                      "| samples | line running (self) |", "|---:|---|", *rows(result.own)])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pyspy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path, help="a profile written by python -m bench --profile")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(format_top(top(args.profile.read_text(), args.top)))


if __name__ == "__main__":
    main()
