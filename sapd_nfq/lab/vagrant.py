"""The lab as three VMs (vagrant/Vagrantfile), reached over ssh.

`vagrant up` in vagrant/ builds client, gw and server with the lab's
addresses and provisions them with the same provision/ scripts the namespace
lab uses: Postfix and Dovecot on server, sapd-nfq on gw (the Debian package,
its systemd unit running gateway.sh's config), the client MTA on client.
`VagrantLab` only talks to them: it offers what `Gate`,
`ClientMTA` and the demo's story use of a `Lab` (the hosts, `state_dir`,
`command`, `run`), so they run unchanged against the VMs:

    with VagrantLab("vagrant") as lab:
        Story(lab, lab.gate(), print).play()
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from sapd_nfq.lab.client_mta import ClientMTA
from sapd_nfq.lab.gate import Gate
from sapd_nfq.lab.topology import Host, Lab, LabError

#: where the Vagrantfile puts the repository, the lab's state, and sapd-nfq on the VMs
REPOSITORY = PurePosixPath("/sapd-nfq")
STATE_DIR = PurePosixPath("/var/lib/sapd-lab")
PROVISION = REPOSITORY / "sapd_nfq" / "lab" / "provision"
SAPD_NFQ = ("/usr/sbin/sapd-nfq",)  # the Debian package's
UNIT = "sapd-nfq.service"
SSH_TIMEOUT = 10  # seconds for an ssh connection to a VM


class VagrantLab:
    """The VMs of the Vagrantfile in `directory`; a context manager (up: fetch their
    ssh settings from vagrant; down: forget them). The VMs stay as they are.

    Each Host's `netns` field holds the VM's name. `via` prefixes vagrant and ssh where
    the VMs are reached from elsewhere (vmhost.py: inside a network namespace), and `env`
    is vagrant's environment (VAGRANT_HOME, where the box is).
    """

    def __init__(self, directory: str | os.PathLike[str], *, via: Sequence[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.directory = Path(directory)
        self.via = list(via)
        self.env = env
        self.state_dir = STATE_DIR
        plan = Lab()  # for its addresses only: constructing a Lab builds nothing
        self.hosts = {role: replace(host, netns=role) for role, host in plan.hosts.items()}
        self.client, self.gw, self.server = (self.hosts[r] for r in ("client", "gw", "server"))
        self._ssh_config: Path | None = None

    def __repr__(self) -> str:
        return f"VagrantLab({str(self.directory)!r})"

    def __enter__(self) -> VagrantLab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Ask vagrant how to reach the VMs (they must be running)."""
        done = subprocess.run([*self.via, "vagrant", "ssh-config"], cwd=self.directory,
                              env=self.env, capture_output=True, text=True)
        if done.returncode:
            raise LabError(f"vagrant ssh-config in {self.directory} failed: "
                           f"{done.stderr.strip()} (are the VMs up? `vagrant up` there)")
        fd, name = tempfile.mkstemp(prefix="sapd-vagrant-ssh-")
        with os.fdopen(fd, "w") as f:
            f.write(done.stdout)
        self._ssh_config = Path(name)

    def down(self) -> None:
        if self._ssh_config is not None:
            self._ssh_config.unlink(missing_ok=True)
            self._ssh_config = None

    def host(self, host: Host | str) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def command(self, host: Host | str, argv: Sequence[str]) -> list[str]:
        """`argv` wrapped to run as root on the host's VM."""
        if self._ssh_config is None:
            raise LabError("VagrantLab is not up: use it as a context manager")
        return [*self.via, "ssh", "-F", str(self._ssh_config), "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={SSH_TIMEOUT}", "-o", "LogLevel=ERROR",
                self.host(host).netns, "sudo -n " + shlex.join(argv)]

    def run(self, host: Host | str, argv: Sequence[str], *, check: bool = True,
            **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run a command on the host's VM and wait for it (subprocess.run keywords)."""
        return subprocess.run(self.command(host, argv), check=check, **kw)

    def gate(self) -> Gate:
        """The sapd-nfq the gw VM was provisioned with (already running, under systemd)."""
        state_dir = STATE_DIR / "gate"
        config = self.run(self.gw, ["cat", str(state_dir / "sapd-nfq.toml")], capture_output=True)
        return Gate(self, auth_ttl=tomllib.loads(config.stdout.decode())["auth_ttl"],
                    state_dir=state_dir, sapd_nfq=SAPD_NFQ, script=PROVISION / "gateway.sh",
                    unit=UNIT)

    def client_mta(self) -> ClientMTA:
        """The client VM's MTA (already running)."""
        return ClientMTA(self, script=PROVISION / "client-mta.sh")
