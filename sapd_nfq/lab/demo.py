"""The story `sapd-nfq demo` plays: real clients against a gated mail server.

Seven steps (five where the gate cannot read the mail server's log), each
told in a line or two, with the command the client ran, what the client saw
(its SMTP reply line, or the POP3 server's answer) and the lines sapd-nfq
logged for it:

1. inbound mail from outside to a local user passes (row 1);
2. a local sender relaying outside without a login is refused with 550 (row 3);
3. the user logs in by POP3 (curl), and sapd-nfq records the login;
4. the same relay passes (row 2);
5. once auth_ttl has run out, the same relay is refused again;
6. where the gate can read Dovecot's log (the namespace lab), the user logs in
   by POP3S, a login no one can read on the wire, and sapd-nfq learns it
   from the log;
7. the same relay passes again.

The story needs only `lab.run` and a `Gate`, so it plays as well on the
VMs of vagrant/ as in the namespace lab (lab/cli.py builds and removes that).
"""

from __future__ import annotations

import math
import re
import shlex
import time
from collections.abc import Callable, Sequence
from typing import Any

from sapd_nfq.lab import LabError, lab_users
from sapd_nfq.lab.gate import Gate

OUTSIDER = "carol@external.example"
USER = "alice"
LOCAL_SENDER = "alice@lab.example"
REMOTE_RECIPIENT = "dave@external.example"
HELO = "client.lab.example"
SMTP_TIMEOUT = 15  # seconds swaks waits for each reply
WINDOW_MARGIN = 1.0  # seconds past the end of the login window before the last try
# The login window must hold step 3 (the login, then `auth list`) and step 4 (a relay):
# three client runs, none slower than the slowest of steps 1 and 2, plus slack.
WINDOW_RUNS = 3
WINDOW_SLACK = 2.0  # seconds
# curl -v shows the server's lines as "< ..."; these answer the login and the LIST.
_POP3_ANSWERS = re.compile(r"< (\+OK (Logged in|\d+ messages)|-ERR)")
_INDENT = "   "


def swaks_view(transcript: str) -> list[str]:
    """What the SMTP client saw that matters: the refusal (and how the connection
    ended), or the reply that took the message."""
    lines = transcript.splitlines()
    refused = [line for line in lines if line.startswith("<**") or line.lstrip().startswith("***")]
    return refused or [line for line in lines if "queued as" in line] or lines[-1:]


def login_window(step: float, auth_ttl: int) -> int:
    """The login window (s) for steps that take up to `step` seconds: `auth_ttl`,
    or longer where steps 3 and 4 would not fit in it."""
    return max(auth_ttl, math.ceil(WINDOW_RUNS * step + WINDOW_SLACK))


class Story:
    """The demo's steps against `lab` with `gate` on its gw; `say` prints a line."""

    def __init__(self, lab: Any, gate: Gate, say: Callable[[str], None]) -> None:
        self.lab = lab
        self.gate = gate
        self.say = say
        self.server = lab.server.ipv4
        self.client = lab.client.ipv4
        self.slowest = 0.0  # seconds: the slowest SMTP step so far

    def play(self) -> bool:
        """Run every step; True if each came out as the relay table says."""
        results = [
            self.smtp(1, f"Inbound mail: {OUTSIDER} writes to {LOCAL_SENDER}. "
                         "Mail to a local recipient always passes.",
                      OUTSIDER, LOCAL_SENDER, accepted=True),
            self.smtp(2, f"{LOCAL_SENDER} sends to {REMOTE_RECIPIENT} through the server, "
                         f"from {self.client}, which has not logged in: a relay, refused.",
                      LOCAL_SENDER, REMOTE_RECIPIENT, accepted=False),
        ]
        self.size_window(self.slowest)
        login_ok, logged_in_at = self.pop3(
            3, f"{USER} collects her mail by POP3 from the same address. sapd-nfq sees "
               "the server accept the login and opens the relay for that address.")
        results.append(login_ok)
        results.append(self.smtp(
            4, f"The same relay again, within {USER}'s login window: it passes.",
            LOCAL_SENDER, REMOTE_RECIPIENT, accepted=True))
        self.wait_for_window(logged_in_at)
        results.append(self.smtp(
            5, "The same relay once more. The window has closed: refused again.",
            LOCAL_SENDER, REMOTE_RECIPIENT, accepted=False))
        if self.gate.login_log is None:
            self.say("")
            self.say("(The gate cannot read the mail server's log here: no POP3S step.)")
            return all(results)
        login_ok, _ = self.pop3(
            6, f"{USER} collects her mail by POP3S: TLS from the first byte, so the login "
               "cannot be read on the wire. sapd-nfq learns it from Dovecot's log "
               f"({self.gate.login_log}).", tls=True)
        results.append(login_ok)
        results.append(self.smtp(
            7, "The same relay again: the encrypted login opened the window.",
            LOCAL_SENDER, REMOTE_RECIPIENT, accepted=True))
        return all(results)

    # --- the steps -------------------------------------------------------------

    def smtp(self, number: int, text: str, sender: str, recipient: str, *,
             accepted: bool) -> bool:
        self._title(number, text)
        # --helo: swaks would otherwise look up this host's name, a resolver timeout
        # (~5 s) where /etc/hosts lacks it
        argv = ["swaks", "--server", self.server, "--helo", HELO, "--from", sender,
                "--to", recipient]
        offset = self.gate.log_size()
        began = time.monotonic()
        done = self.lab.run(self.lab.client, [*argv, "--timeout", str(SMTP_TIMEOUT),
                                              "--h-Subject", f"sapd-nfq demo, step {number}"],
                            check=False, capture_output=True, text=True)
        self.slowest = max(self.slowest, time.monotonic() - began)
        self._command(argv)
        view = swaks_view(done.stdout + done.stderr)
        for line in view:
            self._show("client", line)
        took = done.returncode == 0 and any("queued as" in line for line in view)
        logged = self._logged("PASS" if accepted else "FAIL", offset)
        return self._expect(took == accepted,
                            "the server took the message" if took else "the message was refused",
                            "it should have been " + ("taken" if accepted else "refused")) and logged

    def pop3(self, number: int, text: str, tls: bool = False) -> tuple[bool, float]:
        """The login step; also returns (monotonic) when the login had certainly happened."""
        self._title(number, text)
        url = f"pop3{'s' if tls else ''}://{self.server}/"
        # the certificate the lab made for the mail server when it provisioned it
        ca = ["--cacert", f"{self.lab.state_dir}/mailserver/tls/cert.pem"] if tls else []
        password = lab_users()[USER]
        offset = self.gate.log_size()
        done = self.lab.run(self.lab.client,
                            ["curl", "-v", "-sS", *ca, "--user", f"{USER}:{password}", url],
                            check=False, capture_output=True, text=True)
        logged_in_at = time.monotonic()
        self._command(["curl", *ca, "--user", f"{USER}:PASSWORD", url])
        for line in done.stderr.splitlines():
            if _POP3_ANSWERS.match(line):
                self._show("client", line)
        logged = self._logged("LOGIN", offset)
        for line in self.gate.cli("auth", "list", check=False).stdout.splitlines():
            self._show("logins", line)
        ok = self._expect(done.returncode == 0, f"curl failed ({done.returncode})",
                          "the login should have succeeded")
        return ok and logged, logged_in_at

    def size_window(self, step: float) -> None:
        """Widen the login window where steps take long (a slow machine), so that
        the login and the relay after it fit in it."""
        needed = login_window(step, self.gate.auth_ttl)
        if needed == self.gate.auth_ttl:
            return
        self.say("")
        self.say(f"(A step takes about {step:.1f} s on this machine: the login window is "
                 f"widened from {self.gate.auth_ttl} s to {needed} s so that steps 3 and 4 "
                 "fit in it.)")
        self.gate.set_auth_ttl(needed)

    def wait_for_window(self, logged_in_at: float) -> None:
        left = logged_in_at + self.gate.auth_ttl + WINDOW_MARGIN - time.monotonic()
        self.say("")
        self.say(f"Waiting {max(left, 0):.0f} s for {USER}'s login window to close "
                 f"(auth_ttl = {self.gate.auth_ttl} s here; the default is 1800 s).")
        if left > 0:
            time.sleep(left)

    # --- telling it ------------------------------------------------------------

    def _title(self, number: int, text: str) -> None:
        self.say("")
        self.say(f"{number}. {text}")

    def _command(self, argv: Sequence[str]) -> None:
        self.say(f"{_INDENT}$ {shlex.join(argv)}")

    def _show(self, who: str, line: str) -> None:
        self.say(f"{_INDENT}{who:<8} | {line.rstrip()}")

    def _logged(self, event: str, offset: int) -> bool:
        try:
            lines = self.gate.wait_for_log(event, offset)
        except LabError as exc:
            self.say(f"{_INDENT}!! {exc}")
            return False
        for line in lines:
            self._show("sapd-nfq", line)
        return True

    def _expect(self, ok: bool, got: str, wanted: str) -> bool:
        if not ok:
            self.say(f"{_INDENT}!! {got}, but {wanted}")
        return ok
