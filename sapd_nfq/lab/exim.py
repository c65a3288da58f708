"""Exim, Debian's default MTA, in the lab's server namespace beside Postfix.

provision/exim.sh unpacks Debian's exim4 packages (unpacked.py) under the
lab's state dir and runs the daemon from there on an address of its own,
`ADDRESS`, in a mount namespace where its compiled-in paths (/usr/sbin/exim4,
/etc/exim4) and its Debian-exim user are the state dir's. It delivers the
lab's users to maildirs and logs to `log`, which the tests read; the gate
reads the lab's virtusertable.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from sapd_nfq.lab.remote import HostLog
from sapd_nfq.lab.topology import Lab
from sapd_nfq.lab.unpacked import PROVISION, UnpackedMTA

ADDRESS = "198.18.2.26"  # in the server's 198.18.2.0/24, routed by the gw like the server's own


class Exim(UnpackedMTA):
    name = "exim"
    address = ADDRESS
    virtusertable = PROVISION / "virtusertable"

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.log = HostLog(lab, lab.server, PurePosixPath(self.state_dir, "log", "mainlog"),
                           missing_ok=True)

    def mailbox(self, user: str) -> list[bytes]:
        """The messages delivered to `user`, oldest first."""
        box = self.state_dir / "mail" / user / "new"
        return [p.read_bytes() for p in sorted(box.iterdir())] if box.is_dir() else []
