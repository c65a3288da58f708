"""A sending MTA on the lab's client: a second Postfix that relays through the gateway.

provision/client-mta.sh writes its config (relayhost = [server], everything
under its own state dir, instance postfix-lab-client) and starts and stops
it, inside the client namespace here and on the client VM of vagrant/. Like
`Gate`, it goes through `lab.run` only.

    with ClientMTA(lab) as mta:
        offset = mta.send("alice@lab.example", "dave@external.example")
        line = mta.wait_for_status("dave@external.example", offset)
        assert "status=bounced" in line
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sapd_nfq.lab.remote import HostLog, run_script

SCRIPT = Path(__file__).with_name("provision") / "client-mta.sh"
DELIVERY_TIMEOUT = 15.0  # seconds for Postfix to log a delivery attempt's outcome


class ClientMTA:
    """Postfix on `lab.client`, relaying to [relayhost] (default: the lab's server)."""

    def __init__(self, lab: Any, relayhost: str | None = None,
                 state_dir: PurePosixPath | None = None, script: PurePosixPath | None = None
                 ) -> None:
        self.lab = lab
        self.relayhost = relayhost or lab.server.ipv4
        self.state_dir = PurePosixPath(state_dir or PurePosixPath(lab.state_dir) / "client-mta")
        self.script = PurePosixPath(script or SCRIPT)
        self._log = HostLog(lab, lab.client, self.log_path, missing_ok=True)

    def __repr__(self) -> str:
        return f"ClientMTA(state_dir={str(self.state_dir)!r}, relayhost={self.relayhost!r})"

    @property
    def log_path(self) -> PurePosixPath:
        return self.state_dir / "log" / "postfix.log"

    def __enter__(self) -> ClientMTA:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._script("setup", str(self.state_dir), self.relayhost)
        self._script("start", str(self.state_dir))

    def stop(self) -> None:
        self._script("stop", str(self.state_dir))

    def send(self, sender: str, recipient: str | Sequence[str], subject: str = "sapd-nfq lab") -> int:
        """Submit a message with sendmail, to one recipient or several; return the
        log offset to wait from."""
        recipients = [recipient] if isinstance(recipient, str) else list(recipient)
        to = f"<{recipients[0]}>" if len(recipients) == 1 else "undisclosed-recipients:;"
        offset = self.log_size()
        message = (f"From: <{sender}>\nTo: {to}\nSubject: {subject}\n\n"
                   "Sent by the lab's client MTA through the gateway.\n").encode()
        self.lab.run(self.lab.client, ["sendmail", "-C", str(self.state_dir / "postfix"),
                                       "-f", sender, "--", *recipients],
                     input=message, capture_output=True)
        return offset

    def wait_for_status(self, recipient: str, since: int = 0,
                        timeout: float = DELIVERY_TIMEOUT) -> str:
        """The first log line after byte `since` that gives a status for `recipient`
        (sent, bounced, deferred, ...). LabError if none comes within `timeout`."""
        pattern = re.compile(rf" to=<{re.escape(recipient)}>,.* status=\w+")
        return self._log.wait_for(
            lambda lines: next((line for line in lines if pattern.search(line)), None),
            since, timeout, f"the client MTA logged no delivery status for {recipient}")

    def log_size(self) -> int:
        """The log's length in bytes: an offset for `log_since` and `wait_for_status`."""
        return self._log.size()

    def log_since(self, offset: int) -> list[str]:
        """The log's lines from byte `offset` on."""
        return self._log.since(offset)

    def _script(self, *args: str) -> None:
        run_script(self.lab, self.lab.client, self.script, args)
