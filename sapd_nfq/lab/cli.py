"""`sapd-nfq demo` and `sapd-nfq lab up|down`: the namespace lab as a product.

Both build the lab of sapd_nfq/lab (client -- gw -- server in network
namespaces), start Postfix and Dovecot on the server and sapd-nfq on the gw
(forward mode, interfaces ["to-client"], its files under the lab's state
dir). `demo` then plays the story of demo.py and removes the lab, whatever
happens (Ctrl-C, SIGTERM, a failure); `lab up` leaves the lab running for a
person to explore and prints what to type; `lab down` removes it.

Each has a prefix of its own, so neither touches the other nor the test lab
("sapd"): the demo's namespaces are sapd-demo-*, `lab up`'s sapd-try-*, and
their files are under /run/<prefix>-lab.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .gate import Gate
    from .topology import Lab
    from .vagrant import VagrantLab

DEMO_PREFIX = "sapd-demo"
LAB_PREFIX = "sapd-try"
DEMO_AUTH_TTL = 10  # seconds: short, so the demo can show the window closing
LAB_AUTH_TTL = 300  # seconds: time enough to type the next command
EXIT_FAILED, EXIT_UNABLE = 1, 2
REQUIRED = ("ip", "iptables-restore", "postfix", "dovecot", "openssl", "swaks", "curl")
# Signals that end the program the way Ctrl-C does, so the lab still comes down.
_ENDING = (signal.SIGTERM, signal.SIGHUP)


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `demo` and `lab up|down` to the sapd-nfq command line."""
    demo = sub.add_parser("demo", help="build the lab, show sapd-nfq at work with real "
                                       "mail servers, remove the lab (root)",
                          description="build the lab, play its story with real Postfix and Dovecot "
                                      "behind sapd-nfq (ending with a POP3S login the gate learns "
                                      "from Dovecot's log), remove the lab (root)")
    demo.add_argument("--prefix", default=DEMO_PREFIX,
                      help=f"name prefix of the lab's namespaces (default {DEMO_PREFIX})")
    demo.add_argument("--auth-ttl", type=_seconds, default=DEMO_AUTH_TTL, metavar="S",
                      help=f"the login window in the demo (default {DEMO_AUTH_TTL})")
    demo.add_argument("--vagrant", metavar="DIR", type=Path,
                      help="play the story on the running VMs of DIR/Vagrantfile instead")
    demo.set_defaults(func=cmd_demo)

    lab = sub.add_parser("lab", help="leave the lab running to explore it by hand (root)")
    actions = lab.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="build the lab with sapd-nfq running on its gateway",
                            description="build the lab with sapd-nfq running on its gateway and "
                                        "leave it running to explore by hand; prints the swaks, "
                                        "curl and status commands to type (root)")
    up.add_argument("--auth-ttl", type=_seconds, default=LAB_AUTH_TTL, metavar="S",
                    help=f"the login window (default {LAB_AUTH_TTL})")
    up.add_argument("--no-gate", action="store_true",
                    help="write sapd-nfq's config on the gateway but do not start it")
    down = actions.add_parser("down", help="remove the lab: namespaces, processes, files")
    for action in (up, down):
        action.add_argument("--prefix", default=LAB_PREFIX,
                            help=f"name prefix of the lab's namespaces (default {LAB_PREFIX})")
    up.set_defaults(func=cmd_lab_up)
    down.set_defaults(func=cmd_lab_down)


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of seconds >= 1, got {text!r}")
    return value


def say(line: str = "") -> None:
    print(line, flush=True)


# --- demo ----------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from . import Lab, LabError
    from .demo import Story

    if args.vagrant is not None:
        return _demo_on_vms(args.vagrant)
    if (problem := _unable()) is not None:
        return problem
    started = time.monotonic()
    say("sapd-nfq demo: a POP-before-SMTP gate in front of a real mail server.")
    say("")
    say(f"Building the lab in network namespaces {args.prefix}-client, -gw and -server ...")
    with _ending_signals_exit():
        lab = Lab(args.prefix)
        try:
            gate, timings = _build(lab, args.auth_ttl)
            say(f"Ready in {time.monotonic() - started:.1f} s ({timings}):")
            _describe(lab, gate)
            played = Story(lab, gate, say).play()
        except LabError as exc:
            say(f"sapd-nfq demo: the lab failed: {exc}")
            played = False
        except KeyboardInterrupt:
            say("")
            say("Interrupted.")
            raise
        finally:
            removing = time.monotonic()
            with _uninterrupted():
                lab.down()
            say("")
            say(f"Lab removed in {time.monotonic() - removing:.1f} s: namespaces, processes "
                f"and {lab.state_dir} are gone.")
    say(f"{'Done' if played else 'FAILED'} in {time.monotonic() - started:.1f} s. "
        f"To explore the lab yourself: {_self()} lab up")
    return 0 if played else EXIT_FAILED


def _demo_on_vms(directory: Path) -> int:
    from . import LabError
    from .demo import Story
    from .vagrant import VagrantLab

    started = time.monotonic()
    try:
        with VagrantLab(directory) as lab:
            gate = lab.gate()
            say(f"sapd-nfq demo on the VMs of {directory}/Vagrantfile")
            _describe(lab, gate)
            # An earlier run may have left a login for the client's address in the window.
            gate.cli("auth", "del", lab.client.ipv4, check=False)
            played = Story(lab, gate, say).play()
    except LabError as exc:
        say(f"sapd-nfq demo: {exc}")
        return EXIT_FAILED
    say(f"{'Done' if played else 'FAILED'} in {time.monotonic() - started:.1f} s.")
    return 0 if played else EXIT_FAILED


def _describe(lab: Lab | VagrantLab, gate: Gate) -> None:
    say(f"  client  {lab.client.ipv4:<12} runs swaks (SMTP) and curl (POP3)")
    say(f"  gw      {lab.gw.ipv4:<12} routes to the server and runs sapd-nfq: "
        f'mode "forward", interfaces ["to-client"]')
    say(f"  server  {lab.server.ipv4:<12} Postfix on port 25, Dovecot POP3 on 110, "
        "local domain lab.example")
    say(f"  auth_ttl is {gate.auth_ttl} s here (the default is 1800 s), "
        "so the login window can be seen to close.")
    for line in gate.log_since(0):
        if " running: " in line:
            say(f"  sapd-nfq | {line}")


# --- lab up / down -------------------------------------------------------------

def cmd_lab_up(args: argparse.Namespace) -> int:
    from . import Lab, LabError

    if (problem := _unable()) is not None:
        return problem
    lab = Lab(args.prefix)
    try:
        with _ending_signals_exit():
            try:
                gate, _ = _build(lab, args.auth_ttl, start_gate=not args.no_gate)
            except BaseException:
                with _uninterrupted():
                    lab.down()
                raise
    except LabError as exc:
        print(f"sapd-nfq lab up: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _guide(lab, gate, started=not args.no_gate)
    return 0


def cmd_lab_down(args: argparse.Namespace) -> int:
    from pyroute2 import netns

    from . import Lab

    if os.geteuid() != 0:
        print("sapd-nfq lab down: needs root", file=sys.stderr)
        return EXIT_UNABLE
    lab = Lab(args.prefix)
    present = {h.netns for h in lab.hosts.values()} & set(netns.listnetns())
    with _uninterrupted():
        lab.down()
    say(f"lab {args.prefix} removed" if present or lab.state_dir.exists()
        else f"no lab {args.prefix} was up")
    return 0


def _guide(lab: Lab, gate: Gate, started: bool) -> None:
    from . import lab_users

    me = _self()
    client, gw = (f"ip netns exec {lab.host(role).netns}" for role in ("client", "gw"))
    relay = (f"{client} swaks --server {lab.server.ipv4} --helo client.lab.example "
             "--from alice@lab.example "
             "--to dave@external.example")
    say(f"The lab {lab.prefix} is up; its files are under {lab.state_dir}.")
    say(f"  client  {lab.client.ipv4}, {lab.client.ipv6}  (netns {lab.client.netns})")
    say(f"  gw      {lab.gw.ipv4}  (netns {lab.gw.netns})")
    say(f"  server  {lab.server.ipv4}, {lab.server.ipv6}  (netns {lab.server.netns}): "
        "Postfix on 25, Dovecot POP3 on 110")
    say("  local domain lab.example: alice and bob (POP3 passwords in "
        "sapd_nfq/lab/provision/users)")
    say("")
    if started:
        say(f'sapd-nfq runs on gw: mode "forward", interfaces ["to-client"], '
            f"auth_ttl {gate.auth_ttl} s. Try, as root:")
        say(f"  {relay}")
        say("      # refused with 550: alice's address has not logged in")
        say(f"  {client} curl --user alice:{lab_users()['alice']} pop3://{lab.server.ipv4}/")
        say(f"      # a POP3 login: the address may relay for {gate.auth_ttl} s")
        say(f"  {relay}")
        say("      # now it passes")
    else:
        say("sapd-nfq is configured on gw but not running (--no-gate). Start it, as root:")
        say(f"  {gw} {gate.command_line('up')}")
        say(f"  {gw} {gate.command_line('run')}")
    say("What sapd-nfq logged and holds:")
    say(f"  tail -F {gate.log_path}")
    say(f"  {gw} {gate.command_line('auth', 'list')}")
    say(f"  {gw} {gate.command_line('status')}")
    say("The mail server's side:")
    say(f"  tail {lab.state_dir}/mailserver/log/postfix.log")
    say(f"A shell on the client: {client} bash")
    say("")
    prefix = "" if lab.prefix == LAB_PREFIX else f" --prefix {lab.prefix}"
    say(f"Remove it all with: {me} lab down{prefix}")


# --- shared --------------------------------------------------------------------

def _build(lab: Lab, auth_ttl: int, start_gate: bool = True) -> tuple[Gate, str]:
    """Bring the lab up with the mail server and sapd-nfq on the gw.

    Returns the Gate and how long each part took, as text.
    """
    from . import MailServer
    from .gate import Gate

    mail = MailServer(lab)
    # the gw shares the server's files here: it can follow Dovecot's log
    gate = Gate(lab, auth_ttl=auth_ttl, login_log=PurePosixPath(mail.dovecot_log))
    parts = [("namespaces", lab.up), ("Postfix and Dovecot", mail.start),
             ("sapd-nfq", gate.start if start_gate else gate.setup)]
    timings = []
    for what, start in parts:
        began = time.monotonic()
        start()
        timings.append(f"{what} {time.monotonic() - began:.1f} s")
    return gate, ", ".join(timings)


def _unable() -> int | None:
    """Why the lab cannot be built here (said on stderr, as an exit status), or None."""
    if os.geteuid() != 0:
        print("sapd-nfq: the lab needs root (network namespaces, iptables, Postfix, Dovecot)",
              file=sys.stderr)
        return EXIT_UNABLE
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        print(f"sapd-nfq: the lab needs {', '.join(missing)}; ./setup.sh installs them",
              file=sys.stderr)
        return EXIT_UNABLE
    return None


def _self() -> str:
    """How to run this sapd-nfq again, as a person would type it."""
    from .gate import local_command

    return shlex.join(local_command())


@contextmanager
def _ending_signals_exit() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit, so the `finally` that removes the lab runs.

    Only in this process: pyroute2 forks helpers that inherit the handler and are
    stopped with SIGTERM, and those must die of it at once.
    """
    pid = os.getpid()

    def leave(signum: int, _frame: object) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, leave) for sig in _ENDING}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C and the ending signals off while the lab is being removed."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, *_ENDING)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
