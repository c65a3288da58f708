"""Sendmail, the seed's MTA, in the lab's server namespace beside Postfix.

provision/sendmail.sh unpacks Debian's sendmail packages (never installed:
Debian's MTAs conflict) under the lab's state dir and runs the daemon from
there on an address of its own, `ADDRESS`, added to the server's link. Its
virtusertable is the lab's, compiled with makemap; the text file it was
compiled from is `virtusertable`, for the gate to read.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from sapd_nfq.lab.remote import run_script
from sapd_nfq.lab.topology import Lab, LabError

SCRIPT = Path(__file__).with_name("provision") / "sendmail.sh"
ADDRESS = "198.18.2.25"  # in the server's 198.18.2.0/24, routed by the gw like the server's own
READY_TIMEOUT = 30.0
_POLL = 0.2


class Sendmail:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state_dir = Path(lab.state_dir) / "sendmail"
        self.address = ADDRESS

    @property
    def virtusertable(self) -> Path:
        return self.state_dir / "virtusertable"

    def mailbox(self, user: str) -> list[bytes]:
        """The messages delivered to `user`, oldest first."""
        box = self.state_dir / "mail" / user
        return [p.read_bytes() for p in sorted(box.iterdir())] if box.is_dir() else []

    def __enter__(self) -> Sendmail:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        server = self.lab.server
        self.lab.run(server, ["ip", "addr", "replace", f"{ADDRESS}/24", "dev", "to-gw"])
        # setup on the host: apt-get needs the host's network, not the lab's
        done = subprocess.run([str(SCRIPT), "setup", str(self.state_dir), ADDRESS],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode:
            raise LabError(f"sendmail.sh setup failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()}")
        run_script(self.lab, server, SCRIPT, ["start", str(self.state_dir)])
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._greets():
            if time.monotonic() > deadline:
                raise LabError(f"sendmail not answering on {ADDRESS}:25 after {READY_TIMEOUT}s")
            time.sleep(_POLL)

    def stop(self) -> None:
        run_script(self.lab, self.lab.server, SCRIPT, ["stop", str(self.state_dir)])
        self.lab.run(self.lab.server, ["ip", "addr", "del", f"{ADDRESS}/24", "dev", "to-gw"],
                     check=False, capture_output=True)

    def _greets(self) -> bool:
        with self.lab.inside(self.lab.server):
            sock = socket.socket()
        try:
            sock.settimeout(2)
            sock.connect((ADDRESS, 25))
            return sock.recv(100).startswith(b"220")
        except OSError:
            return False
        finally:
            sock.close()
