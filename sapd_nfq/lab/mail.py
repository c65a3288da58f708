"""Real Postfix and Dovecot (POP3, IMAP) in the lab's server namespace.

The configuration is written by provision/mailserver.sh (the same script can
provision a VM) into a directory under the lab's state dir; the daemons run
from there with `postfix -c` / `dovecot -c` and never read or write /etc/postfix
or /etc/dovecot.

Postfix: port 25 on the server's IPv4 and IPv6 address, relays for every lab
client, delivers lab.example (alice, bob, postmaster -> alice) to maildirs and
discards every other domain. Dovecot: POP3 on 110 (STLS) and 995 (TLS), IMAP
on 143 (STARTTLS) and 993 (TLS), with USER/PASS, LOGIN, SASL PLAIN, LOGIN and
CRAM-MD5; its log is `dovecot_log`. Both use one self-signed certificate, made
at provisioning (`cert`).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from sapd_nfq.lab.topology import Host, Lab, LabError

PROVISION = Path(__file__).with_name("provision")
SCRIPT = PROVISION / "mailserver.sh"
VIRTUSERTABLE = PROVISION / "virtusertable"
LOCAL_DOMAIN = "lab.example"

SMTP_PORT = 25
POP3_PORT = 110
IMAP_PORT = 143
POP3S_PORT = 995
IMAPS_PORT = 993
MAIL_PORTS = frozenset((SMTP_PORT, POP3_PORT, IMAP_PORT, POP3S_PORT, IMAPS_PORT))
READY_TIMEOUT = 15.0  # seconds for both daemons to listen after start
DELIVERY_TIMEOUT = 10.0
_POLL = 0.05
_LOG_TAIL = 20  # log lines quoted when a start fails
_TCP_LISTEN = "0A"  # socket state in /proc/net/tcp{,6}


def lab_users() -> dict[str, str]:
    """The lab's POP3 users and their (lab-only) passwords, from provision/users."""
    users = {}
    for line in (PROVISION / "users").read_text().splitlines():
        if line and not line.startswith("#"):
            name, password = line.split(":", 1)
            users[name] = password
    return users


class MailServer:
    """Postfix + Dovecot in `lab.server`; a context manager around start/stop."""

    def __init__(self, lab: Lab, state_dir: Path | None = None) -> None:
        self.lab = lab
        self.state_dir = Path(state_dir or lab.state_dir / "mailserver")
        self.users = lab_users()

    def __repr__(self) -> str:  # users' passwords stay out of reprs
        return f"MailServer(state_dir={str(self.state_dir)!r}, users={sorted(self.users)})"

    @property
    def postfix_log(self) -> Path:
        return self.state_dir / "log" / "postfix.log"

    @property
    def dovecot_log(self) -> Path:
        return self.state_dir / "log" / "dovecot.log"

    @property
    def cert(self) -> Path:
        return self.state_dir / "tls" / "cert.pem"

    def maildir(self, user: str) -> Path:
        return self.state_dir / "mail" / user / "Maildir"

    def __enter__(self) -> MailServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Provision (idempotent), start both daemons, wait until both listen."""
        server = self.lab.server
        self._script(None, "setup", str(self.state_dir), server.ipv4, server.ipv6)
        self._script(server, "start", str(self.state_dir))
        deadline = time.monotonic() + READY_TIMEOUT
        while not MAIL_PORTS <= self._listening():
            if time.monotonic() > deadline:
                raise LabError(f"mail server not listening after {READY_TIMEOUT}s\n"
                               + self._log_tails())
            time.sleep(_POLL)

    def stop(self) -> None:
        """Stop both daemons and wait until they have exited."""
        self._script(self.lab.server, "stop", str(self.state_dir))

    def wait_for_mail(self, user: str, count: int = 1,
                      timeout: float = DELIVERY_TIMEOUT) -> list[Path]:
        """Wait until `user`'s maildir holds at least `count` messages; return them."""
        maildir = self.maildir(user)
        deadline = time.monotonic() + timeout
        while True:
            messages = sorted(p for sub in ("new", "cur") if (maildir / sub).is_dir()
                              for p in (maildir / sub).iterdir())
            if len(messages) >= count:
                return messages
            if time.monotonic() > deadline:
                raise LabError(f"{user} has {len(messages)} of {count} messages "
                               f"after {timeout}s\n" + self._log_tails())
            time.sleep(_POLL)

    def _script(self, host: Host | None, *args: str) -> None:
        """Run mailserver.sh (inside `host`, or here for None); LabError on failure."""
        argv = [str(SCRIPT), *args]
        # A file, not a pipe, for its output: the daemons inherit it and keep it open.
        with tempfile.TemporaryFile() as out:
            if host is not None:
                argv = self.lab.command(host, argv)
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            if done.returncode:
                out.seek(0)
                # Postfix writes fatal errors to stderr only on a terminal: quote its log too.
                raise LabError(f"mailserver.sh {args[0]} failed ({done.returncode}): "
                               f"{out.read().decode(errors='replace').strip()}\n"
                               f"{self._log_tails()}")

    def _listening(self) -> set[int]:
        """TCP ports with a listening socket in the server namespace."""
        ports = set()
        with self.lab.inside(self.lab.server):
            # /proc/thread-self/net is the netns of this thread, which inside() switched.
            for table in ("tcp", "tcp6"):
                for line in Path("/proc/thread-self/net", table).read_text().splitlines()[1:]:
                    fields = line.split()
                    if fields[3] == _TCP_LISTEN:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports

    def _log_tails(self) -> str:
        tails = []
        for log in (self.postfix_log, self.dovecot_log):
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-_LOG_TAIL:]
                tails.append(f"--- {log}\n" + "\n".join(lines))
        return "\n".join(tails)
