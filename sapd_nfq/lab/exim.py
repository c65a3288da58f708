"""Exim, Debian's default MTA, in the lab's server namespace beside Postfix.

provision/exim.sh unpacks Debian's exim4 packages (unpacked.py) under the
lab's state dir and runs the daemon from there on an address of its own,
`ADDRESS`, in a mount namespace where its compiled-in paths (/usr/sbin/exim4,
/etc/exim4) and its Debian-exim user are the state dir's. It delivers the
lab's users to maildirs and logs to `log`, which the tests read; the gate
reads the lab's virtusertable. `EximClient` is Exim as a client's sending
MTA, from the same packages.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from sapd_nfq.lab.remote import HostLog
from sapd_nfq.lab.topology import Lab, LabError
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


class EximClient:
    """Exim as the sending MTA on `lab.client`: each message is delivered at once
    to `relayhost` port 25 (default: the lab's server), with CHUNKING where offered."""

    def __init__(self, lab: Lab, relayhost: str | None = None) -> None:
        self.lab = lab
        self.relayhost = relayhost or lab.server.ipv4
        self.state_dir = Path(lab.state_dir) / "exim-client"
        self.script = PROVISION / "exim.sh"
        self.log = HostLog(lab, lab.client, PurePosixPath(self.state_dir, "log", "mainlog"),
                           missing_ok=True)

    def setup(self) -> None:
        # on the host: apt-get needs the host's network, not the lab's
        done = subprocess.run([str(self.script), "setup-client", str(self.state_dir),
                               self.relayhost],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode:
            raise LabError(f"exim.sh setup-client failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()}")

    def send(self, sender: str, recipients: Sequence[str], subject: str) -> list[str]:
        """Submit a message and deliver it; the log lines it wrote."""
        offset = self.log.size()
        message = (f"From: <{sender}>\nTo: undisclosed-recipients:;\nSubject: {subject}\n\n"
                   "Sent by the lab's sending Exim through the gateway.\n").encode()
        self.lab.run(self.lab.client, [str(self.script), "send", str(self.state_dir), sender,
                                       "--", *recipients], input=message, capture_output=True)
        return self.log.since(offset)
