"""Helpers for the daemon's lab tests: sapd-nfq itself in a lab host, the mail
clients on the client host, and the Postfix log.

`Gate` runs the real command line (`python -m sapd_nfq up|run|down|...`)
inside a namespace, as an administrator would, with a config of its own in a
test's directory. The clients are the ones users have: swaks and curl as
programs, smtplib and poplib from the client namespace, each bound to a
source address of the test's own so logins never carry over between tests.

The demo's `sapd_nfq.lab.gate.Gate` goes through the provisioning scripts so
that it runs unchanged on the Vagrant VMs; these tests need more than it
offers (input mode, any config key, signals, kills and restarts), so they
drive the command line directly.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import poplib
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sapd_nfq.admin.control import DaemonNotRunning, request
from sapd_nfq.admin.status import kernel_queues
from sapd_nfq.lab import Lab, MailServer
from sapd_nfq.lab.mail import VIRTUSERTABLE
from sapd_nfq.wiring.config import load_config
from sapd_nfq.wiring.filewatch import SETTLE_INTERVAL, WATCH_INTERVAL

REPO = Path(__file__).resolve().parents[2]
SERVICE_UNIT = REPO / "packaging" / "sapd-nfq.service"
START_TIMEOUT = 10.0  # seconds for `run` to answer on its control socket
CLI_TIMEOUT = 30.0
CLIENT_TIMEOUT = 10.0  # seconds a mail client waits for the server
POLL = 0.05
#: seconds from writing a watched file to its reload: the next watch sees the
#: change, the one after reads it once it has held still; plus a busy machine
FILE_RELOAD_TIMEOUT = 2 * WATCH_INTERVAL + SETTLE_INTERVAL + 10.0
# The gate's refusal of a relay, in place (whatever the MTA's form, Postfix's
# is `550 Log in.`) or of the whole session: a 550 telling the user to log in.
RELAY_DENIED = re.compile(r"550 [^\r\n(]*log in", re.IGNORECASE)


def relay_denied(reply: str | bytes) -> bool:
    """Whether `reply` (a reply, or a line quoting one) is the gate's refusal of a relay."""
    text = reply.decode(errors="replace") if isinstance(reply, bytes) else reply
    return RELAY_DENIED.search(text) is not None


# What every lab test needs; imported from here, not from conftest: several
# conftest modules share that name, and the last one imported holds it.
REQUIRED_BINARIES = ("ip", "iptables-restore", "ip6tables-restore", "tcpdump", "postfix",
                     "dovecot", "openssl", "swaks", "curl")
REQUIRED_MODULES = ("pyroute2",)

def missing_capability() -> str | None:
    """Why the lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, tcpdump, Postfix, Dovecot)"
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    missing += [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"lab tests need {', '.join(missing)}, not found"
    return None


def require_lab() -> None:
    reason = missing_capability()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: a missing capability is a failure)", pytrace=False)
    pytest.skip(reason)


EXTERNAL = "ext@external.example"
LOCAL = "alice@lab.example"
# This checkout's sapd_nfq, for the commands run inside the lab's namespaces.
_ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def wait_until(condition: Callable[[], object], timeout: float, what: str,
               interval: float = POLL) -> object:
    """Poll `condition` until it returns something true; AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def mangle_rules(lab: Lab, host: str) -> str:
    """Both families' mangle tables in `host`, without timestamps and counters."""
    text = ""
    for save in ("iptables-save", "ip6tables-save"):
        text += lab.run(host, [save, "-t", "mangle"], capture_output=True, text=True).stdout
    return "".join(re.sub(r"\[\d+:\d+\]", "", line) + "\n"
                   for line in text.splitlines() if not line.startswith("#"))


class Gate:
    """sapd-nfq in one lab host: its config file, its rules, its daemon.

    Mode "forward" runs it in gw with clients coming in on to-client; mode
    "input" runs it in the server namespace beside Postfix and Dovecot.
    """

    def __init__(self, lab: Lab, workdir: Path, mode: str = "forward", **settings: object) -> None:
        self.lab = lab
        self.host = "gw" if mode == "forward" else "server"
        self.virtusertable = workdir / "virtusertable"
        shutil.copyfile(VIRTUSERTABLE, self.virtusertable)
        self.path = workdir / "sapd-nfq.toml"
        self.stderr = workdir / "daemon.log"
        values: dict[str, object] = {
            "mode": mode,
            "virtusertable": str(self.virtusertable),
            "state": str(workdir / "logins.sqlite"),
            "run_dir": str(workdir / "run"),
            # The client pool is one IPv6 /64 standing for many clients: a login
            # covers its own address (test_first_day_lab.py shows the /64 default).
            "ipv6_login_prefix": 128,
        }
        if mode == "forward":
            values["interfaces"] = ["to-client"]
        values.update(settings)
        self.path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        self.config = load_config(self.path)
        self.rules_before: str | None = None
        self.proc: subprocess.Popen | None = None
        #: (exited, answering again) monotonic times of each restart by `supervise`
        self.restarts: list[tuple[float, float]] = []
        self._supervisor: tuple[threading.Event, threading.Thread] | None = None

    # -- the command line -------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sapd_nfq", *args, "--config", str(self.path)]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`sapd-nfq ARGS --config CFG` inside the gate's host."""
        done = self.lab.run(self.host, self._argv(*args), check=False, capture_output=True,
                            text=True, cwd=REPO, env=_ENV, timeout=CLI_TIMEOUT)
        if check and done.returncode != 0:
            raise AssertionError(f"sapd-nfq {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}")
        return done

    def status(self) -> tuple[int, dict]:
        """(exit status, parsed JSON) of `sapd-nfq status --json`."""
        done = self.cli("status", "--json", check=False)
        try:
            return done.returncode, json.loads(done.stdout)
        except ValueError:
            raise AssertionError(f"status --json printed no JSON:\n{done.stdout}{done.stderr}") from None

    def up(self) -> None:
        if self.rules_before is None:
            self.rules_before = mangle_rules(self.lab, self.host)
        self.cli("up")

    def down(self) -> None:
        self.cli("down")

    # -- the daemon --------------------------------------------------------

    def start(self) -> None:
        """`sapd-nfq run` in the background; returns once it answers `status`."""
        assert not self.running, "the daemon is already running"
        with open(self.stderr, "ab") as err:
            self.proc = self.lab.spawn(self.host, self._argv("run"), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, env=_ENV)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                if request(self.config, self.config.queue, "status", timeout=1.0).get("ok"):
                    return
            except DaemonNotRunning:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("sapd-nfq run did not come up:\n" + self.log())
            time.sleep(POLL)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the daemon and wait for it (no restart); its exit status."""
        self.unsupervise()
        assert self.proc is not None
        return self.lab.stop(self.proc, sig)

    def supervise(self, restart_sec: float) -> None:
        """Start the daemon again `restart_sec` after it exits, as systemd's
        Restart=always does, until `stop` or `unsupervise`."""
        assert self._supervisor is None
        done = threading.Event()

        def watch() -> None:
            while not done.wait(POLL):
                if self.proc is None or self.proc.poll() is None:
                    continue
                exited = time.monotonic()
                if done.wait(restart_sec):
                    return
                self.start()
                self.restarts.append((exited, time.monotonic()))

        thread = threading.Thread(target=watch, name="supervisor", daemon=True)
        self._supervisor = (done, thread)
        thread.start()

    def unsupervise(self) -> None:
        if self._supervisor is not None:
            done, thread = self._supervisor
            done.set()
            thread.join()
            self._supervisor = None

    @property
    def pid(self) -> int:
        """The running daemon's pid, as it reports it."""
        return self.control("status")["pid"]

    def kernel_queue(self) -> dict[str, int]:
        """The kernel's counters of the daemon's queue (waiting, queue_dropped, ...),
        read in the gate's namespace without asking the daemon (it may be stopped)."""
        with self.lab.inside(self.host):
            # /proc/thread-self/net is the namespace of this thread, which inside() switched.
            queues = kernel_queues("/proc/thread-self/net/netfilter/nfnetlink_queue")
        assert self.config.queue in queues, f"no process bound to queue {self.config.queue}"
        return queues[self.config.queue]

    def send_signal(self, sig: int) -> None:
        assert self.running
        os.kill(self.proc.pid, sig)

    def control(self, command: str) -> dict:
        """Ask the daemon directly over its control socket."""
        return request(self.config, self.config.queue, command)

    # -- its log -----------------------------------------------------------

    def log(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def wait_for_log(self, pattern: str, timeout: float = 5.0, after: int = 0) -> str:
        """The first log line from line `after` on that matches `pattern` (a regex)."""
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.log_lines()[after:] if regex.search(line)), None)
        return wait_until(found, timeout, f"a daemon log line matching {pattern!r}\n{self.log()}")

    def write_virtusertable(self, text: str) -> None:
        """Replace the table the way an administrator should: a new file renamed over it."""
        new = self.virtusertable.with_suffix(".new")
        new.write_text(text)
        os.replace(new, self.virtusertable)


def stop_and_check(gate: Gate, mail: MailServer) -> list[str]:
    """Stop the daemon (and its supervisor, if any) and remove its rules; what went
    wrong: no clean exit on SIGTERM, rules left behind, a traceback or a password in
    its log."""
    problems = []
    gate.unsupervise()
    if gate.running:
        code = gate.stop()
        if code != 0:
            problems.append(f"sapd-nfq run exited {code} on SIGTERM")
    gate.down()
    if mangle_rules(gate.lab, gate.host) != gate.rules_before:
        problems.append(f"`down` left rules behind in {gate.host}")
    log = gate.log()
    if "Traceback" in log:
        problems.append("the daemon logged a traceback")
    if any(password in log for password in mail.users.values()):
        problems.append("a password reached the daemon's log")
    return problems


# --- mail clients on the client host -------------------------------------------

class SourcePOP3(poplib.POP3):
    """poplib.POP3 whose connection starts from a chosen client address."""

    def __init__(self, host: str, source: str, port: int = 110,
                 timeout: float = CLIENT_TIMEOUT) -> None:
        self.source = source
        super().__init__(host, port, timeout)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


def pop3_login(lab: Lab, mail: MailServer, source: str, server: str, user: str = "alice",
               timeout: float = CLIENT_TIMEOUT) -> int:
    """Log in by USER/PASS from `source` and return the message count."""
    with lab.inside("client"):
        pop = SourcePOP3(server, source, timeout=timeout)
    try:
        pop.user(user)
        pop.pass_(mail.users[user])
        return pop.stat()[0]
    finally:
        pop.quit()


def curl_pop3_plain(lab: Lab, mail: MailServer, source: str, server: str, user: str = "alice",
                    password: str | None = None) -> subprocess.CompletedProcess:
    """List a mailbox with curl, logging in by AUTH PLAIN from `source`
    (with the user's own password unless one is given)."""
    host = f"[{server}]" if ":" in server else server
    password = mail.users[user] if password is None else password
    return lab.run("client", ["curl", "-sS", "--max-time", str(CLIENT_TIMEOUT),
                              "--interface", source, "--login-options", "AUTH=PLAIN",
                              "--user", f"{user}:{password}", f"pop3://{host}/"],
                   capture_output=True, text=True, check=False)


def swaks(lab: Lab, source: str, server: str, sender: str, recipient: str,
          subject: str, *extra: str) -> subprocess.CompletedProcess:
    """One swaks session from `source` (IPv4 only: swaks here lacks IO::Socket::INET6)."""
    # --helo: no lookup of this host's own name (a resolver timeout where /etc/hosts lacks it)
    return lab.run("client", ["swaks", "--server", server, "--local-interface", source,
                              "--helo", "client.lab.example",
                              "--from", sender, "--to", recipient, "--h-Subject", subject,
                              "--timeout", str(int(CLIENT_TIMEOUT)), *extra],
                   capture_output=True, text=True, check=False)


def smtp_session(lab: Lab, source: str, server: str,
                 timeout: float = CLIENT_TIMEOUT) -> smtplib.SMTP:
    """An SMTP connection from `source` after EHLO; the socket stays in the client host."""
    with lab.inside("client"):
        smtp = smtplib.SMTP(server, 25, source_address=(source, 0), timeout=timeout,
                            local_hostname="client.lab.example")
    smtp.ehlo("client.lab.example")
    return smtp


@dataclass(frozen=True)
class Refused:
    """How the client saw a refusal: the reply code and text it read."""

    code: int
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


def send_mail(lab: Lab, source: str, server: str, sender: str, recipient: str,
              subject: str, timeout: float = CLIENT_TIMEOUT) -> Refused | None:
    """Send one message with smtplib; None if the server took it, else the refusal."""
    smtp = smtp_session(lab, source, server, timeout)
    message = f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n\r\n{subject}\r\n"
    try:
        smtp.sendmail(sender, [recipient], message)
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = exc.recipients[recipient]
        return Refused(code, text.decode())
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        return Refused(exc.smtp_code, exc.smtp_error.decode())
    finally:
        smtp.close()
    return None


def try_rcpt(lab: Lab, source: str, server: str, sender: str, recipient: str,
             timeout: float = CLIENT_TIMEOUT) -> Refused | None:
    """MAIL and RCPT only (nothing is sent); None if the RCPT was accepted."""
    smtp = smtp_session(lab, source, server, timeout)
    try:
        code, text = smtp.mail(sender)
        if code == 250:
            code, text = smtp.rcpt(recipient)
        if code == 250:
            smtp.quit()
            return None
        return Refused(code, text.decode())
    finally:
        smtp.close()


def raw_transaction(lab: Lab, family: int, source: str, server: str, sender: str,
                    rcpts: list[str], tag: str) -> list[bytes]:
    """After EHLO, write MAIL, the RCPTs and DATA in one send(); the reply lines to
    them, then (if DATA got 354) to a message whose subject holds `tag`, and to QUIT."""
    with lab.inside("client"):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(CLIENT_TIMEOUT)
    sock.bind((source, 0))
    sock.connect((server, 25))
    reader = sock.makefile("rb")
    try:
        reader.readline()  # the greeting
        sock.sendall(b"EHLO client.lab.example\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        burst = b"MAIL FROM:<" + sender.encode() + b">\r\n"
        burst += b"".join(b"RCPT TO:<" + r.encode() + b">\r\n" for r in rcpts) + b"DATA\r\n"
        sock.sendall(burst)
        replies = [reader.readline() for _ in range(len(rcpts) + 2)]
        if replies[-1].startswith(b"354"):
            sock.sendall(f"Subject: in one segment {tag}\r\n\r\n{tag}\r\n.\r\n".encode())
            replies.append(reader.readline())
        try:
            sock.sendall(b"QUIT\r\n")
            replies.append(reader.readline())
        except OSError:  # a refused session is reset
            replies.append(b"")
        return replies
    finally:
        reader.close()
        sock.close()


# --- the Postfix log -------------------------------------------------------------

class PostfixLog:
    """The lab Postfix's log from the moment this object was made."""

    def __init__(self, mail: MailServer) -> None:
        self.path = mail.postfix_log
        self.start = self.path.stat().st_size if self.path.exists() else 0

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read().decode(errors="replace").splitlines()

    def mentions(self, text: str) -> list[str]:
        return [line for line in self.lines() if text in line]

    def wait_for(self, pattern: str, timeout: float = 5.0) -> str:
        regex = re.compile(pattern)

        def found() -> str | None:
            return next((line for line in self.lines() if regex.search(line)), None)
        return wait_until(found, timeout, f"a Postfix log line matching {pattern!r} in\n"
                          + "\n".join(self.lines()))

    def disconnect(self, client: str, timeout: float = 5.0) -> str:
        """smtpd's closing line for `client`: it counts the commands it received."""
        return self.wait_for(rf"disconnect from \S+\[{re.escape(client)}\]", timeout)


# --- relaying, judged from both ends -----------------------------------------------

def external() -> str:
    """A recipient no other test names, so the Postfix log can be searched for it."""
    return f"relay-{uuid.uuid4().hex[:10]}@external.example"


def assert_relay_refused(lab: Lab, mail_server: MailServer, gate: Gate, source: str, server: str,
                         sender: str, recipient: str) -> None:
    postfix = PostfixLog(mail_server)
    refused = send_mail(lab, source, server, sender, recipient, "refused")
    assert refused is not None and relay_denied(str(refused)), refused
    closing = postfix.disconnect(source)
    assert "rcpt=" not in closing, closing  # smtpd counts each RCPT it read
    assert postfix.mentions(recipient) == []
    gate.wait_for_log(rf"FAIL client={re.escape(source)} .*recipient='{re.escape(recipient)}'")


def assert_relayed(lab: Lab, mail_server: MailServer, source: str, server: str, sender: str,
                   recipient: str) -> None:
    postfix = PostfixLog(mail_server)
    refused = send_mail(lab, source, server, sender, recipient, "relayed")
    assert refused is None, f"refused: {refused}"
    # The lab's Postfix takes mail for other domains and discards it.
    postfix.wait_for(rf"to=<{re.escape(recipient)}>.*status=sent")


# --- faults -------------------------------------------------------------------------

def unit_restart_policy(unit: Path = SERVICE_UNIT) -> tuple[str, float]:
    """Restart= and RestartSec= (seconds) of the systemd unit the daemon ships with."""
    values = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line)
    # systemd's defaults: no restart; 100 ms between exit and restart
    return values.get("Restart", "no"), float(values.get("RestartSec", "0.1"))


@dataclass(frozen=True)
class Outcome:
    """One session of a Traffic: what it returned, or the exception it raised."""

    kind: str
    began: float
    ended: float
    result: object


class Traffic:
    """Client sessions run again and again, each kind in a thread, until stopped::

        with Traffic() as traffic:
            traffic.run("inbound", lambda i: send_mail(lab, ...))
            ...                       # the fault, while the sessions go on
        traffic.outcomes("inbound")   # what every session returned or raised
    """

    def __init__(self) -> None:
        self.log: list[Outcome] = []
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, kind: str, session: Callable[[int], object], pause: float = 0.0) -> None:
        """Call `session(0)`, `session(1)`, ... with `pause` seconds between calls."""
        def loop() -> None:
            for i in itertools.count():
                if self._done.is_set():
                    return
                began = time.monotonic()
                try:
                    result = session(i)
                except Exception as exc:  # recorded: the test judges it
                    result = exc
                self.log.append(Outcome(kind, began, time.monotonic(), result))
                self._done.wait(pause)

        thread = threading.Thread(target=loop, name=f"traffic-{kind}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Let every session in progress end, then return."""
        self._done.set()
        for thread in self._threads:
            thread.join()

    def outcomes(self, kind: str) -> list[Outcome]:
        return [o for o in self.log if o.kind == kind]

    def wait_for(self, kind: str, count: int, timeout: float) -> None:
        """Wait until `count` more sessions of `kind` have ended."""
        target = len(self.outcomes(kind)) + count
        wait_until(lambda: len(self.outcomes(kind)) >= target, timeout,
                   f"{count} more {kind} sessions")
