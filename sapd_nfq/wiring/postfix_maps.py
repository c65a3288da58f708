"""Reading a Postfix site's recipient maps with Postfix's own tools.

`postmap -s TYPE:NAME` lists a map of any listable type (hash, btree, lmdb,
cdb, texthash), and `postconf -h recipient_delimiter` says how the site
cuts extensions, both with `-c` the site's configuration directory. They
run when the daemon starts or reloads, never per packet: the keys go into a
pure PostfixMap (engine/postfix_virtual.py) that answers from memory. Map
types that cannot be listed (regexp, pcre, tcp, proxy, ...) would need one
lookup per recipient on the packet path, so they are refused when the
config is read.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..engine.errors import MapError
from ..engine.postfix_virtual import PostfixMap

#: map types postmap can list, and the file each keeps its data in
LISTABLE = {"hash": ".db", "btree": ".db", "lmdb": ".lmdb", "cdb": ".cdb", "texthash": ""}
TIMEOUT = 30.0


def split_spec(spec: str) -> tuple[str, str]:
    """("hash", "/etc/postfix/virtual") of "hash:/etc/postfix/virtual";
    ValueError for a spec that is not a listable `type:name`."""
    kind, sep, name = spec.partition(":")
    if not sep or not name or "\0" in spec:
        raise ValueError("not a Postfix map (type:name)")
    if kind not in LISTABLE:
        raise ValueError(f"map type {kind!r} cannot be listed by postmap -s "
                         f"(use one of {', '.join(sorted(LISTABLE))})")
    return kind, name


def watched_files(spec: str) -> list[Path]:
    """The files whose change means the map changed: its data file and source."""
    kind, name = split_spec(spec)
    files = [Path(name + LISTABLE[kind])]
    return files if not LISTABLE[kind] else [*files, Path(name)]


def _run(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MapError(f"{' '.join(argv)}: {exc}") from None
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()
        raise MapError(f"{' '.join(argv)} failed: {message[-1] if message else f'exit {done.returncode}'}")
    return done.stdout


def recipient_delimiter(config_directory: Path) -> str:
    return _run(["postconf", "-c", str(config_directory), "-h", "recipient_delimiter"]).strip()


def load(spec: str, config_directory: Path, delimiter: str) -> PostfixMap:
    """The keys of one map; raises MapError (the caller keeps its old table)."""
    try:
        split_spec(spec)
    except ValueError as exc:
        raise MapError(f"{spec}: {exc}") from None
    dump = _run(["postmap", "-c", str(config_directory), "-s", spec])
    return PostfixMap.from_dump(dump, spec, delimiter)
