"""The `sapd-nfq` command line."""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ENGINE, version
from .engine import counters as count
from .engine.errors import SapdError
from .engine.logins import MemoryLoginStore
from .engine.policy import Fail
from .lab.cli import add_commands as add_lab_commands
from .wiring.access import config_warnings
from .wiring.build import load_policy, login_scope, open_logins
from .wiring.config import DEFAULT_CONFIG_PATH, Config, load_config

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
#: seconds `auth add/del` waits for a running daemon to have read the change
#: (without the wait it would see it at its next look, within about a second)
SEEN_TIMEOUT = 3.0


def _config(args: argparse.Namespace, warn: bool = True) -> Config:
    """The config `--config` names; with `warn`, says on stderr if others
    may read its secret or write it."""
    path = Path(args.config)
    if args.config == DEFAULT_CONFIG_PATH and not path.exists():
        return Config.default()
    config = load_config(path)
    if warn:
        for warning in config_warnings(path, config):
            print(f"sapd-nfq: warning: {warning}", file=sys.stderr)
    return config


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None


# -- check ---------------------------------------------------------------------

def cmd_check(args: argparse.Namespace) -> int:
    config = _config(args)
    logins = open_logins(config)
    try:
        verdict = load_policy(config, logins).decide(args.client, args.sender, args.recipient, time.time())
    finally:
        logins.close()
    failed = isinstance(verdict, Fail)
    print(f"{'FAIL' if failed else 'PASS'}  {verdict.row}: {verdict.reason}")
    return EXIT_FAIL if failed else EXIT_PASS


# -- why -----------------------------------------------------------------------

def gather_why(config: Config, address: str) -> dict[str, Any]:
    """What the running workers remember of `address`, or the store alone."""
    from .admin.control import DaemonNotRunning, request, worker_queues

    replies = []
    for queue in worker_queues(config):
        try:
            reply = request(config, queue, f"why {address}")
        except DaemonNotRunning:
            continue
        if not reply.get("ok"):
            raise SapdError(f"queue {queue}: {reply.get('error')}")
        replies.append(reply)
    if replies:
        login = next((r["login"] for r in replies if r["login"]), None)
        return {"client": address, "daemon": True, "login": login,
                "enforce": all(r.get("enforce", True) for r in replies),
                "logins": sorted((x for r in replies for x in r["logins"]), key=lambda x: x["time"]),
                "decisions": sorted((x for r in replies for x in r["decisions"]), key=lambda x: x["time"])}
    logins = open_logins(config)
    try:
        found = logins.get(address, time.time())
    finally:
        logins.close()
    return {"client": address, "daemon": False, "enforce": config.enforce,
            "logins": [], "decisions": [],
            "login": None if found is None else {"address": found.address, "user": found.user,
                                                 "expires": found.expires, "source": found.source}}


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def cmd_why(args: argparse.Namespace) -> int:
    config = _config(args)
    why = gather_why(config, args.client)
    if args.json:
        print(json.dumps(why, indent=2))
        return 0
    now, client, login = time.time(), why["client"], why["login"]
    if not why["daemon"]:
        print("no daemon running: from the login store alone (no decisions, no lapsed logins)")
    if not why["enforce"]:
        print("monitor mode (enforce = false): WOULD-FAIL is a refusal not carried out")
    if login:
        network = f" (the login of {login['address']})" if login["address"] != client else ""
        print(f"{client}: logged in as {login['user'] or '-'} via {login['source']} until "
              f"{_when(login['expires'])} ({int(login['expires'] - now)} s left){network}")
    elif why["logins"]:
        last = why["logins"][-1]
        print(f"{client}: not logged in; the last login, {last['user'] or '-'} via {last['source']} "
              f"at {_when(last['time'])}, lapsed at {_when(last['expires'])}")
    else:
        print(f"{client}: not logged in" + ("; no login seen since the daemon started" if why["daemon"] else ""))
    for d in why["decisions"]:
        print(f"  {_when(d['time'])} {d['verdict']} <{d['sender']}> -> <{d['recipient']}>  {d['row']}: {d['reason']}")
    return 0


# -- auth ----------------------------------------------------------------------

def cmd_auth(args: argparse.Namespace) -> int:
    config = _config(args)
    logins = open_logins(config)
    now = time.time()
    try:
        if args.action == "list":
            entries = logins.entries(now)
            for login in entries:
                expires = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(login.expires))
                print(f"{login.address:<39} {login.user or '-':<20} {expires}  {login.source}")
            if not entries:
                print("no logins held")
        elif args.action == "add":
            ttl = args.ttl if args.ttl is not None else config.auth_ttl
            login = logins.add(args.address, args.user, now, ttl, source="manual")
            print(f"added {login.address} for {ttl} s")
        else:
            key = login_scope(config).key(args.address)
            if not logins.remove(args.address):
                print(f"no login held for {key}", file=sys.stderr)
                return EXIT_FAIL
            print(f"removed {key}")
    finally:
        logins.close()
    if args.action != "list":
        _tell_daemons(config)
    return 0


def _tell_daemons(config: Config) -> None:
    """Have the running daemons read the store now, and wait until they have,
    so that the next session is judged with the change."""
    from .admin.control import DaemonNotRunning, request, worker_queues
    from .admin.report import WorkerStatus

    def store(queue: int) -> dict[str, Any]:
        return WorkerStatus.from_json(request(config, queue, "status")).store

    for queue in worker_queues(config):
        try:
            ticket = request(config, queue, "logins-changed").get("ticket")
            deadline = time.monotonic() + SEEN_TIMEOUT
            while ticket is not None and store(queue)["reloaded"] < ticket:
                if time.monotonic() > deadline:
                    print(f"queue {queue}: the daemon has not read the change yet "
                          f"(its store: {store(queue).get('last_error')})", file=sys.stderr)
                    break
                time.sleep(0.02)
        except DaemonNotRunning:
            continue  # nothing to tell; it reads the store when it starts


# -- replay --------------------------------------------------------------------

def cmd_replay(args: argparse.Namespace) -> int:
    from .admin.pcap import read_packets
    from .engine.core import Engine

    config = _config(args)
    logins = MemoryLoginStore(login_scope(config))
    engine = Engine(config, load_policy(config, logins), logins)
    seeded = False
    with open(args.capture, "rb") as capture:
        for stamp, packet, wire_len in read_packets(capture):
            if not seeded:
                for address in args.login:
                    logins.add(address, None, stamp, config.auth_ttl, source="manual")
                seeded = True
            for notice in engine.handle(packet, stamp, wire_len).notices:
                if args.json:
                    print(json.dumps(notice.as_dict()), flush=True)
                else:
                    clock = time.strftime("%H:%M:%S", time.gmtime(notice.time))
                    print(f"{clock}.{int(notice.time % 1 * 1000):03d} {notice}")
    if not args.json:
        print(f"packets={engine.counters[count.PACKETS]} flows={engine.counters[count.FLOWS]} "
              f"pass={engine.counters[count.PASS]} fail={engine.counters[count.FAIL]} "
              f"logins={engine.counters[count.LOGINS]}", file=sys.stderr)
    return 0


# -- the daemon and its rules ---------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    from .kernel import rules
    from .kernel.interfaces import refuse_blind, validate

    config = _config(args)
    if config.interfaces:
        validate(config.interfaces)
    host = refuse_blind(config.mode, config.interfaces)
    rules.install(rules.RuleSpec.from_config(config, host.bridge_ports(config.interfaces)))
    queues = f"{config.queue}" if config.workers == 1 else f"{config.queue}..{config.queue + config.workers - 1}"
    print(f"rules installed (mode {config.mode}, queue {queues}); "
          "SMTP fails closed until `sapd-nfq run` is bound to the queue")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from .kernel import rules

    rules.remove()
    print("rules removed")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .kernel.interfaces import refuse_blind
    from .kernel.supervise import run_workers
    from .wiring.logsetup import setup_logging

    config = _config(args, warn=False)
    # a daemon whose rules cannot see the mail would only look like a gate
    refuse_blind(config.mode, config.interfaces)
    path = Path(args.config)
    log = setup_logging(config.log_level)
    for warning in config_warnings(path, config):
        log.warning("%s", warning)
    # a build that exists but cannot run has warned at import, before logging was set up
    (log.warning if ENGINE.warn else log.info)("running the %s", ENGINE)
    return run_workers(config, path if path.exists() else None)


def cmd_reload(args: argparse.Namespace) -> int:
    from .admin.control import request, worker_queues

    config = _config(args)
    failed = False
    for queue in worker_queues(config):
        reply = request(config, queue, "reload")
        if reply.get("ok"):
            print(f"queue {queue}: reloaded, {reply.get('entries')} virtusertable entries")
        else:
            failed = True
            print(f"queue {queue}: reload failed, still running the old config: {reply.get('error')}")
    return EXIT_FAIL if failed else 0


def _store_line(store: dict[str, Any]) -> str:
    line = f"{store['backend']} {'connected' if store['connected'] else 'UNAVAILABLE'}"
    if store.get("last_sync"):
        line += f", read {int(time.time() - store['last_sync'])} s ago"
    line += f", {store['pending_writes']} writes pending"
    if store.get("write_errors") or store.get("dropped_writes"):
        line += f", {store['write_errors']} write errors, {store['dropped_writes']} dropped"
    if store.get("last_error"):
        line += f": {store['last_error']}"
    return line


def cmd_status(args: argparse.Namespace) -> int:
    from .admin.status import gather_status

    config = _config(args)
    status = gather_status(config)
    if args.json:
        print(json.dumps(status.as_json(), indent=2, default=str))
    else:
        families = {name: fam.get("installed") for name, fam in status.rules.items()
                    if isinstance(fam, dict)}
        rules_text = ", ".join(f"{name} {'installed' if ok else 'absent'}" for name, ok in families.items())
        print(f"rules:    {rules_text or status.rules}")
        opens = {name: fam["smtp_opens"] for name, fam in status.rules.items()
                 if isinstance(fam, dict) and "smtp_opens" in fam}
        if opens:
            print("smtp:     connections opened through this host / into the queue: "
                  + ", ".join(f"{name} {n['host']}/{n['queued']}" for name, n in opens.items()))
        for problem in status.blind:
            print(f"BLIND:    {problem}")
        for queue in status.queues:
            worker = queue.worker
            if worker is not None:
                up = int(time.time() - worker.started)
                print(f"daemon:   queue {queue.queue} running, pid {worker.pid}, up {up} s, "
                      f"{worker.virtusertable_entries} virtusertable entries, "
                      + ("enforcing" if worker.enforce else "MONITOR MODE (enforce = false)")
                      + (f", {worker.engine} engine" if worker.engine else ""))
                print(f"          flows tracked {worker.flows_tracked}, "
                      f"decisions pass {worker.decisions['pass']} fail {worker.decisions['fail']} "
                      f"would-fail {worker.decisions.get('would_fail', 0)}, "
                      f"packets {worker.counters.get(count.PACKETS, 0)}")
                if worker.receive is not None:
                    print(f"          GSO {'on' if worker.receive.gso else 'off'}, "
                          f"truncated {worker.counters.get(count.TRUNCATED, 0)}, "
                          f"receive buffer full {worker.receive.overruns} times, "
                          f"accepts in {worker.receive.batches} batch verdicts"
                          + (f", {worker.receive.verdict_errors} verdicts not sent"
                             if worker.receive.verdict_errors else ""))
                if worker.would_refuse:
                    print("          would refuse: " + ", ".join(
                        f"{reason} {n}" for reason, n in sorted(worker.would_refuse.items())))
                if worker.last_reload_error:
                    print(f"          last reload FAILED: {worker.last_reload_error}")
                print("store:    " + _store_line(worker.store))
            else:
                closed = " (SMTP is blocked: the rules fail closed)" if config.enforce else \
                    " (monitor mode: the rules let SMTP by)"
                print(f"daemon:   queue {queue.queue} NOT running"
                      + (closed if all(families.values()) and families else ""))
            kernel = queue.kernel
            if kernel:
                print(f"kernel:   queue {queue.queue} waiting {kernel['waiting']}, "
                      f"dropped {kernel['queue_dropped']} (queue full), {kernel['user_dropped']} (netlink)")
        sources = ", ".join(f"{source} {n}" for source, n in sorted(status.logins_by_source.items()))
        print(f"logins:   {status.logins_held} held" + (f" ({sources})" if sources else ""))
    return 0 if status.rules_installed and status.daemon_running and not status.blind else 3


# -- parser --------------------------------------------------------------------

class _Version(argparse.Action):
    """`--version`, its metadata read only when asked for (importlib.metadata
    costs the daemon about 4 MB that it keeps for good)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "show program's version number and exit"
                 ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapd-nfq", description=__doc__)
    parser.add_argument("--version", action=_Version)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=DEFAULT_CONFIG_PATH, metavar="FILE",
                        help=f"TOML config file (default {DEFAULT_CONFIG_PATH}; built-in defaults if absent)")
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser(
        "check", parents=[common], help="judge one envelope against the relay table",
        description="PASS or FAIL and the row of the relay table that decided; "
                    "exit 0 PASS, 1 FAIL, 2 bad input")
    check.add_argument("--client", required=True, type=_address, metavar="IP", help="client IP address")
    check.add_argument("--from", dest="sender", required=True, metavar="ADDR", help="envelope sender ('' for <>)")
    check.add_argument("--to", dest="recipient", required=True, metavar="ADDR", help="recipient")
    check.set_defaults(func=cmd_check)

    auth = sub.add_parser("auth", help="the login store")
    actions = auth.add_subparsers(dest="action", required=True)
    changes = ("; works while the daemon runs, and returns once the running daemon "
               "has read the change")
    actions.add_parser("list", parents=[common], help="logins held: address, user, expiry",
                       description="the logins the store holds: address, user, expiry and source")
    add = actions.add_parser("add", parents=[common], help="grant an address a login window",
                             description="grant an address a login window (source `manual`)" + changes)
    add.add_argument("address", type=_address, metavar="IP")
    add.add_argument("--user", default=None, metavar="NAME")
    add.add_argument("--ttl", type=int, default=None, metavar="S", help="seconds (default: auth_ttl)")
    delete = actions.add_parser("del", parents=[common], help="end an address's login window",
                                description="end an address's login window" + changes)
    delete.add_argument("address", type=_address, metavar="IP")
    auth.set_defaults(func=cmd_auth)

    replay = sub.add_parser(
        "replay", parents=[common], help="run the engine over a pcap capture",
        description="run the engine over a tcpdump capture, time taken from the capture, "
                    "and print each event")
    replay.add_argument("capture", metavar="CAPTURE.pcap")
    replay.add_argument("--json", action="store_true", help="one JSON object a line")
    replay.add_argument("--login", action="append", default=[], type=_address, metavar="IP",
                        help="treat IP as logged in from the capture's start (repeatable)")
    replay.set_defaults(func=cmd_replay)

    for name, func, text, description in (
        ("up", cmd_up, "install the NFQUEUE rules (IPv4 and IPv6)",
         "install the rules: IPv4 and IPv6, atomic, idempotent (rules/README.md lists them)"),
        ("down", cmd_down, "remove exactly the rules `up` installed", None),
        ("run", cmd_run, "the daemon, in the foreground",
         "the daemon, in the foreground (systemd unit: packaging/sapd-nfq.service)"),
        ("reload", cmd_reload, "make the running daemon re-read config and virtusertable",
         "make the running daemon re-read config and virtusertable at once, keeping flows "
         "and logins; SIGHUP does the same"),
    ):
        sub.add_parser(name, parents=[common], help=text, description=description).set_defaults(func=func)
    why = sub.add_parser(
        "why", parents=[common], help="a client's login and its last decisions",
        description="why a client was refused: its login now (source, user, expiry) or the last "
                    "one and when it lapsed, and its last decisions (time, sender, recipient, row, "
                    "reason); from the store alone, and saying so, when no daemon runs")
    why.add_argument("client", type=_address, metavar="IP")
    why.add_argument("--json", action="store_true")
    why.set_defaults(func=cmd_why)
    status = sub.add_parser(
        "status", parents=[common], help="rules, daemon, queue counters, flows, logins",
        description="rules installed, daemon running, kernel queue counters (drops included), "
                    "flows tracked, logins held (by source), the login store (connected, writes "
                    "pending), decisions so far; exit 3 unless the rules are installed and every "
                    "worker runs")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    add_lab_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    try:
        return command(args)
    except (SapdError, OSError) as exc:
        print(f"sapd-nfq: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
