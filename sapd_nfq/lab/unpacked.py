"""An MTA from Debian's packages unpacked beside the lab's Postfix (Sendmail, Exim).

Debian's MTAs conflict as packages, so none is installed: a provisioning
script (`NAME.sh setup|start|stop STATE_DIR`) unpacks its packages under the
lab's state dir and runs the daemon from there, inside the server namespace,
on an address of its own added to the server's link.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from sapd_nfq.lab.remote import run_script
from sapd_nfq.lab.topology import Lab, LabError

PROVISION = Path(__file__).with_name("provision")
READY_TIMEOUT = 30.0
_POLL = 0.2


class UnpackedMTA:
    """One such MTA: `name` names its script and its state dir; it listens on `address`:25."""

    name: str
    address: str

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.state_dir = Path(lab.state_dir) / self.name
        self.script = PROVISION / f"{self.name}.sh"

    def __enter__(self) -> UnpackedMTA:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        server = self.lab.server
        self.lab.run(server, ["ip", "addr", "replace", f"{self.address}/24", "dev", "to-gw"])
        # setup on the host: apt-get needs the host's network, not the lab's
        done = subprocess.run([str(self.script), "setup", str(self.state_dir), self.address],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode:
            raise LabError(f"{self.script.name} setup failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()}")
        run_script(self.lab, server, self.script, ["start", str(self.state_dir)])
        deadline = time.monotonic() + READY_TIMEOUT
        while not self._greets():
            if time.monotonic() > deadline:
                raise LabError(f"{self.name} not answering on {self.address}:25 "
                               f"after {READY_TIMEOUT}s")
            time.sleep(_POLL)

    def stop(self) -> None:
        run_script(self.lab, self.lab.server, self.script, ["stop", str(self.state_dir)])
        self.lab.run(self.lab.server, ["ip", "addr", "del", f"{self.address}/24", "dev", "to-gw"],
                     check=False, capture_output=True)

    def _greets(self) -> bool:
        with self.lab.inside(self.lab.server):
            sock = socket.socket()
        try:
            sock.settimeout(2)
            sock.connect((self.address, 25))
            return sock.recv(100).startswith(b"220")
        except OSError:
            return False
        finally:
            sock.close()
