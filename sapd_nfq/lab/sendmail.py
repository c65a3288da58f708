"""Sendmail, the seed's MTA, in the lab's server namespace beside Postfix.

provision/sendmail.sh unpacks Debian's sendmail packages (unpacked.py) under
the lab's state dir and runs the daemon from there on an address of its own,
`ADDRESS`. Its virtusertable is the lab's, compiled with makemap; the text
file it was compiled from is `virtusertable`, for the gate to read.
"""

from __future__ import annotations

from pathlib import Path

from sapd_nfq.lab.unpacked import UnpackedMTA

ADDRESS = "198.18.2.25"  # in the server's 198.18.2.0/24, routed by the gw like the server's own


class Sendmail(UnpackedMTA):
    name = "sendmail"
    address = ADDRESS

    @property
    def virtusertable(self) -> Path:
        return self.state_dir / "virtusertable"

    def mailbox(self, user: str) -> list[bytes]:
        """The messages delivered to `user`, oldest first."""
        box = self.state_dir / "mail" / user
        return [p.read_bytes() for p in sorted(box.iterdir())] if box.is_dir() else []
