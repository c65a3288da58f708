"""Postfix's recipient maps: which addresses a Postfix site takes as its own.

A site whose MTA is Postfix lists its recipients in Postfix maps
(`virtual_mailbox_maps`, `virtual_alias_maps`), not in a sendmail
virtusertable. An address is local when one of these keys is in the map,
tried in virtual(5)'s order:

    user+extension@domain   user@domain (extension stripped)   @domain

The extension starts at the first character of the site's
`recipient_delimiter` (Postfix takes any of several characters). Postfix
folds lookup keys to lower case; so does this. The forms without a domain
(`user`) apply only to Postfix's own local domains and are not consulted.

Any value counts: a virtual alias to some outside address is still a
recipient Postfix accepts. Reading the map is the adapter's job
(sapd_nfq/wiring/postfix_maps.py, through `postmap -s`, so every listable map type
works); this module only holds the keys and answers lookups.
"""

from __future__ import annotations

from collections.abc import Iterable

from .addresses import ascii_lower, split_mailbox


class PostfixMap:
    __slots__ = ("_keys", "delimiter", "source")

    def __init__(self, keys: Iterable[str], source: str, delimiter: str = "") -> None:
        self._keys = frozenset(ascii_lower(key) for key in keys)
        self.source = source
        self.delimiter = delimiter

    @classmethod
    def from_dump(cls, text: str, source: str, delimiter: str = "") -> PostfixMap:
        """The keys of `postmap -s` output: `key<whitespace>value` a line."""
        return cls((line.split(None, 1)[0] for line in text.splitlines() if line.strip()),
                   source, delimiter)

    def keys_for(self, address: str) -> list[str]:
        """The keys virtual(5) tries for `address`, in order; [] for none."""
        mailbox = split_mailbox(address)
        if mailbox is None:
            return []
        local, domain = mailbox
        keys = [f"{local}@{domain}"]
        cut = min((i for i in (local.find(c) for c in self.delimiter) if i > 0), default=-1)
        if cut > 0:
            keys.append(f"{local[:cut]}@{domain}")
        keys.append(f"@{domain}")
        return keys

    def is_local(self, address: str) -> bool:
        return any(key in self._keys for key in self.keys_for(address))

    def local_keys(self) -> frozenset[str]:
        """Every key: any value makes an address local."""
        return self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"<PostfixMap {self.source} ({len(self)} keys)>"
