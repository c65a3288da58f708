"""sapd-nfq on the lab's gateway, in forward mode in front of the mail server.

provision/gateway.sh writes the config, installs the rules and starts the
daemon, inside the gw namespace here and unchanged on the gw VM of vagrant/.
Everything goes through `lab.run`, so a Gate works on a namespace `Lab` and
on a `VagrantLab` alike.

    with Lab() as lab, MailServer(lab), Gate(lab, auth_ttl=10) as gate:
        lab.run("client", ["swaks", "--server", lab.server.ipv4, ...])
        gate.wait_for_log("FAIL")
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sapd_nfq.lab.remote import HostLog, run_script
from sapd_nfq.lab.topology import LabError

SCRIPT = Path(__file__).with_name("provision") / "gateway.sh"
#: where clients come in: the gw's link to the client, in the lab and on the VMs
CLIENT_INTERFACE = "to-client"
LOG_TIMEOUT = 5.0  # seconds for a log line to appear after the packet that caused it


def local_command() -> tuple[str, ...]:
    """The command that runs this sapd-nfq: the console script if that is what is
    running, else this interpreter with this package on its path."""
    program = Path(sys.argv[0])
    if program.name == "sapd-nfq":
        return (str(program.resolve()),)
    root = Path(__file__).resolve().parents[2]
    return ("env", f"PYTHONPATH={root}", sys.executable, "-m", "sapd_nfq")


class Gate:
    """sapd-nfq on `lab.gw`; a context manager around start/stop.

    `sapd_nfq` is the command that runs sapd-nfq on the gw (default: this one).
    Its words are joined with spaces for gateway.sh, so none may contain one.
    With `unit` (a systemd unit that `gateway.sh unit` set up), systemd starts and
    stops the daemon.
    """

    def __init__(self, lab: Any, *, auth_ttl: int, state_dir: PurePosixPath | None = None,
                 sapd_nfq: Sequence[str] | None = None, script: PurePosixPath | None = None,
                 login_log: PurePosixPath | None = None, unit: str | None = None) -> None:
        self.lab = lab
        self.auth_ttl = auth_ttl
        #: the mail server's log the gate learns encrypted logins from, where it can read it
        self.login_log = login_log
        self.state_dir = PurePosixPath(state_dir or PurePosixPath(lab.state_dir) / "gate")
        self.sapd_nfq = tuple(sapd_nfq or local_command())
        self.script = PurePosixPath(script or SCRIPT)
        self.unit = unit
        self._log = HostLog(lab, lab.gw, self.log_path)
        if any(" " in word for word in self.sapd_nfq):
            raise LabError(f"gateway.sh cannot run {shlex.join(self.sapd_nfq)}: "
                           "a path in it contains a space")

    def __repr__(self) -> str:
        return f"Gate(state_dir={str(self.state_dir)!r}, auth_ttl={self.auth_ttl})"

    @property
    def config_path(self) -> PurePosixPath:
        return self.state_dir / "sapd-nfq.toml"

    @property
    def log_path(self) -> PurePosixPath:
        return self.state_dir / "log" / "sapd-nfq.log"

    def __enter__(self) -> Gate:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def setup(self) -> None:
        """Write the config (forward mode, interfaces [to-client]) and the virtusertable."""
        log = [] if self.login_log is None else [str(self.login_log)]
        self._script("setup", str(self.state_dir), CLIENT_INTERFACE, str(self.auth_ttl), *log)

    def start(self) -> None:
        """Set up, install the rules, start the daemon; return once it is bound."""
        self.setup()
        self._script("start", str(self.state_dir))

    def set_auth_ttl(self, auth_ttl: int) -> None:
        """Rewrite the config with another login window and reload the running daemon."""
        self.auth_ttl = auth_ttl
        self.setup()
        self.cli("reload")

    def stop(self) -> None:
        """Stop the daemon, remove the rules."""
        self._script("stop", str(self.state_dir))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[Any]:
        """`sapd-nfq ARGS --config <the gate's config>` on the gw; output captured as text."""
        done: subprocess.CompletedProcess[Any] = self.lab.run(
            self.lab.gw, [*self.sapd_nfq, *args, "--config", str(self.config_path)],
            check=check, capture_output=True, text=True)
        return done

    def command_line(self, *args: str) -> str:
        """The shell line that runs `sapd-nfq ARGS` against this gate, for a person to type."""
        return shlex.join([*self.sapd_nfq, *args, "--config", str(self.config_path)])

    # --- the log -------------------------------------------------------------

    def log_size(self) -> int:
        """The log's length in bytes: an offset for `log_since` and `wait_for_log`."""
        return self._log.size()

    def log_since(self, offset: int) -> list[str]:
        """The log's lines from byte `offset` on."""
        return self._log.since(offset)

    def wait_for_log(self, event: str, since: int = 0, timeout: float = LOG_TIMEOUT) -> list[str]:
        """Wait until a line for `event` (PASS, FAIL, LOGIN, ...) follows byte `since`;
        return every line from there. LabError if none comes within `timeout`."""
        return self._log.wait_for(
            lambda lines: lines if any(f" {event} client=" in line for line in lines) else None,
            since, timeout, f"sapd-nfq logged no {event}")

    def _script(self, *args: str) -> None:
        unit = [f"SAPD_NFQ_UNIT={self.unit}"] if self.unit else []
        run_script(self.lab, self.lab.gw, self.script, args,
                   env=[f"SAPD_NFQ={' '.join(self.sapd_nfq)}", *unit])
