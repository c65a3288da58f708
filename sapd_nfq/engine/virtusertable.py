"""The sendmail virtusertable: which addresses are local.

The file is makemap's text format: one `key value...` per line, the key is the
first token, blank lines and lines starting with `#` are skipped, keys are
folded to lower case, and of duplicate keys the first wins. Keys are
`user@domain`, `user+detail@domain`, `user++@domain`, `user+*@domain`,
`++@domain`, `+*@domain` or the catch-all `@domain`.

An address is looked up the way sendmail's ruleset 0 does it, first hit wins:

    user+detail@dom   user++@dom (detail not empty)   user+*@dom   user@dom
    ++@dom (detail not empty)   +*@dom   @dom

and without a +detail just `user@dom`, then `@dom`. It is local when a key is
found and its value does not start with `error:` (sendmail rejects those).

Reload contract: `load` builds a complete new table or raises MapError; it
never returns half a file. A caller that reloads keeps serving its old table
when the new file is broken, and reports the error (which names file:line).
"""

from __future__ import annotations

import os
import re

from .addresses import ascii_lower, split_mailbox
from .errors import MapError

_SEP = " \t\v\f\r"  # makemap splits at isspace(); "\n" already ends the line
_SPLIT = re.compile(f"[{_SEP}]+")
_KEY = re.compile(r"[^@]*@[^@]+")
_ERROR = re.compile(r"error[ \t]*:", re.IGNORECASE)


def _candidates(local: str, domain: str) -> list[str]:
    keys = [f"{local}@{domain}"]
    user, plus, detail = local.partition("+")
    if plus and user:
        if detail:
            keys.append(f"{user}++@{domain}")
        keys += [f"{user}+*@{domain}", f"{user}@{domain}"]
        if detail:
            keys.append(f"++@{domain}")
        keys.append(f"+*@{domain}")
    keys.append(f"@{domain}")
    return keys


def _parse(text: str, source: str) -> tuple[dict[str, str], tuple[str, ...]]:
    entries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    warnings: list[str] = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip(_SEP) or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        if line[0] in _SEP:
            raise MapError(f"{where}: leading whitespace: a line must start with its key")
        key, *rest = _SPLIT.split(line, maxsplit=1)
        key = ascii_lower(key)
        value = rest[0].strip(_SEP) if rest else ""
        if not _KEY.fullmatch(key) or not key.isprintable():
            raise MapError(f"{where}: key {key[:80]!r} is not an address or @domain")
        if not value:
            raise MapError(f"{where}: key {key[:80]!r} has no value")
        if key in entries:
            warnings.append(f"{where}: duplicate key {key[:80]!r}: line {first_line[key]} wins")
            continue
        entries[key] = value
        first_line[key] = lineno
    return entries, tuple(warnings)


class VirtUserTable:
    """A parsed virtusertable. Build one with `parse` or `load`.

    `source` names the file (or "<string>"), `mtime` is the file's
    modification time when loaded (None for parsed text), `warnings` lists
    what makemap would also warn about (duplicate keys).
    """

    __slots__ = ("_entries", "source", "mtime", "warnings")

    def __init__(
        self,
        entries: dict[str, str],
        source: str,
        mtime: float | None = None,
        warnings: tuple[str, ...] = (),
    ) -> None:
        self._entries = entries
        self.source = source
        self.mtime = mtime
        self.warnings = warnings

    @classmethod
    def parse(cls, text: str, source: str = "<string>") -> VirtUserTable:
        """Parse makemap text; raises MapError naming `source:line`."""
        entries, warnings = _parse(text, source)
        return cls(entries, source, warnings=warnings)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> VirtUserTable:
        """Read and parse a file; raises MapError (the caller keeps its old table)."""
        name = os.fspath(path)
        try:
            with open(name, "rb") as f:
                mtime = os.fstat(f.fileno()).st_mtime
                data = f.read()
        except OSError as e:
            raise MapError(f"{name}: cannot read: {e.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            lineno = data.count(b"\n", 0, e.start) + 1
            raise MapError(f"{name}:{lineno}: not UTF-8 (byte 0x{data[e.start]:02x})") from None
        entries, warnings = _parse(text, name)
        return cls(entries, name, mtime, warnings)

    def lookup(self, address: str) -> str | None:
        """The value sendmail's lookup order finds for address, or None."""
        mailbox = split_mailbox(address)
        if mailbox is None:
            return None
        for key in _candidates(*mailbox):
            value = self._entries.get(key)
            if value is not None:
                return value
        return None

    def is_local(self, address: str) -> bool:
        """Found, and not an `error:` entry. The null sender is never local."""
        value = self.lookup(address)
        return value is not None and not _ERROR.match(value)

    def local_keys(self) -> frozenset[str]:
        """The keys that make an address local (found, and not `error:`)."""
        return frozenset(k for k, v in self._entries.items() if not _ERROR.match(v))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"<VirtUserTable {self.source} ({len(self)} keys)>"
