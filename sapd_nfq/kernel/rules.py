"""The iptables rules that hand the mail flows to the daemon: render, install, remove, report.

The rule set lives in the mangle table, in chains of our own, hooked by one
jump at the top of INPUT/OUTPUT (mode "input") or FORWARD (mode "forward").
rules/README.md gives the full listing and the reasons; the short version:

- mangle, not filter: a queue verdict of NF_ACCEPT ends the traversal of the
  table that queued the packet. Queued from mangle, an accepted packet still
  meets the host's filter rules; queued from the top of filter, it would skip
  them all.
- Our chains never ACCEPT: what they let by, they RETURN, so the rest of the
  host's rules still apply. They only queue, or drop what conntrack calls
  INVALID.
- Directions are told apart by hook, not by port alone: a client's packets
  are picked by destination port, the server's by source port, so the MTA's
  own outgoing deliveries (to some remote port 25) are never queued.
- A packet is taken for the server's only if it did not come in from the
  client side. Input mode gets that from the hook (OUTPUT sees only what
  this host sends); on a gateway a client can put a packet with the server's
  address and port on its own link, so mode "forward" never queues as the
  server's what came in on a client interface, and drops such spoofs before
  routing (rpfilter in PREROUTING), where the kernel would otherwise also
  answer them with an ICMPv6 redirect to the real server.
- A client interface that is a bridge port is matched as one (physdev): a
  bridged packet enters iptables as the bridge (`-i br0`) whichever port it
  came in on. rpfilter cannot tell sides apart inside one subnet, so the
  bridge's guard asks conntrack instead: a reply-direction packet from a
  mail port that comes in on a client port, of a connection opened from a
  client port, is the client speaking for the server.
- Counters for `status`: the SMTP connections that cross this host at all
  (the SEEN hook, on every interface) against those that reach the queue,
  so "mail passes but none is judged" shows.

Each family goes in as one iptables-restore --noflush transaction, built from
the templates in rules/ and from what iptables-save shows is there already, so
that installing twice gives the same rule set and a changed configuration
converges to the new one.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from string import Template
from typing import Any

from sapd_nfq.engine.errors import ConfigError, SapdError
from sapd_nfq.kernel.interfaces import check_name
from sapd_nfq.kernel.marks import BYPASS_MARK, CLIENT_OPENED_MARK, INJECT_MARK, INJECT_MASK
from sapd_nfq.kernel.nfq_config import MAX_COPY_RANGE

# --- Names ---------------------------------------------------------------------
TABLE = "mangle"
TO_SERVER = "SAPD_NFQ_TO_SERVER"
FROM_SERVER = "SAPD_NFQ_FROM_SERVER"
SMTP_CHAIN = "SAPD_NFQ_SMTP"
#: POP3's and IMAP's chain: both only teach logins, and both fail open alike
MAILBOX_CHAIN = "SAPD_NFQ_POP3"
GUARD = "SAPD_NFQ_GUARD"
PORT_GUARD = "SAPD_NFQ_PORT_GUARD"
SEEN = "SAPD_NFQ_SEEN"
CHAINS = (TO_SERVER, FROM_SERVER, SMTP_CHAIN, MAILBOX_CHAIN, GUARD, PORT_GUARD, SEEN)
#: the chains whose drops are spoofs (status and metrics count them)
GUARDS = (GUARD, PORT_GUARD)

# A source checkout (or editable install) reads rules/ beside the package; a
# wheel installs the same files as data under the environment's prefix.
TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "rules"
if not TEMPLATE_DIR.is_dir():
    TEMPLATE_DIR = Path(sys.prefix) / "share" / "sapd-nfq" / "rules"
#: multiport takes at most 15 ports in one rule.
MULTIPORT_MAX = 15
#: One pure ACK in this many is still queued at random: the receiver's ACKs are how
#: the daemon forgets the bytes it keeps for comparing retransmissions.
PURE_ACKS_QUEUED = 16
#: TCP header lengths (in 32-bit words) of the pure ACKs let by: no options, timestamps.
PURE_ACK_DOFFS = (5, 8)
COMMAND_TIMEOUT = 30.0


class RulesError(SapdError):
    """An iptables command failed; the message carries its stderr."""


@dataclass(frozen=True)
class Family:
    name: str
    save: str
    restore: str


IPV4 = Family("ipv4", "iptables-save", "iptables-restore")
IPV6 = Family("ipv6", "ip6tables-save", "ip6tables-restore")
FAMILIES = (IPV4, IPV6)


@dataclass(frozen=True)
class RuleSpec:
    """The configuration the rules depend on (field names are the config keys).

    `interfaces` are the ones clients reach the mail servers through; empty in
    mode "input" means every interface but lo. Mode "forward" needs them: a
    gateway cannot otherwise tell a client's SMTP session from the servers'
    own deliveries to the outside, and would queue those as relay attempts.
    `workers` queues from `queue` on share the flows (--queue-balance).
    `bridge_ports` are the `interfaces` that are ports of a bridge (a fact of
    the host, not a config key: sapd_nfq.kernel.interfaces finds them); they are
    matched by physdev, the others by -i/-o.
    """

    mode: str = "input"
    smtp_ports: tuple[int, ...] = (25,)
    pop3_ports: tuple[int, ...] = (110,)
    imap_ports: tuple[int, ...] = (143,)
    interfaces: tuple[str, ...] = ()
    queue: int = 0
    workers: int = 1
    pop3_fail_open: bool = True
    bridge_ports: tuple[str, ...] = ()
    #: false (monitor mode): SMTP fails open too, as nothing is refused anyway
    enforce: bool = True

    def __post_init__(self) -> None:
        # The keys are checked where they are read (wiring/config.py); what is
        # left here is what only the rules need: sorted ports, so that a
        # reordered list renders the same rules, and interface names that are
        # safe to paste into a rule.
        for key in ("smtp_ports", "pop3_ports", "imap_ports"):
            object.__setattr__(self, key, tuple(sorted(set(getattr(self, key)))))
        names = tuple(dict.fromkeys(self.interfaces))
        for name in names:
            check_name(name)
        if self.mode == "forward" and not names:
            raise ConfigError(
                "interfaces: mode 'forward' needs the interfaces clients come in "
                "through; without them the servers' own outgoing mail is queued too"
            )
        object.__setattr__(self, "interfaces", names)
        ports = tuple(dict.fromkeys(self.bridge_ports))
        stray = [port for port in ports if port not in names or port.endswith("+")]
        if stray:
            raise ConfigError(f"bridge ports {', '.join(map(repr, stray))} are not named in interfaces")
        if ports and self.mode != "forward":
            raise ConfigError("interfaces: a bridge port is a client interface only in mode "
                              "'forward'; this host's own mail comes in as the bridge")
        object.__setattr__(self, "bridge_ports", ports)

    @classmethod
    def from_config(cls, config: object, bridge_ports: Iterable[str] = ()) -> RuleSpec:
        """The rule keys of a loaded configuration (sapd_nfq.wiring.config.Config),
        with the bridge ports among its interfaces."""
        return cls(**{field.name: getattr(config, field.name) for field in fields(cls)
                      if field.name != "bridge_ports"}, bridge_ports=tuple(bridge_ports))

    def came_in(self, name: str) -> str:
        """The match for a packet that came in on client interface `name`."""
        return f"-m physdev --physdev-in {name}" if name in self.bridge_ports else f"-i {name}"

    def goes_out(self, name: str) -> str:
        """The match for a packet leaving by client interface `name` (FORWARD only:
        a bridge port is known there for bridged packets alone)."""
        return (f"-m physdev --physdev-out {name} --physdev-is-bridged"
                if name in self.bridge_ports else f"-o {name}")


# --- Rendering (pure) ----------------------------------------------------------

@dataclass(frozen=True)
class Hook:
    """One jump from a built-in chain into ours; `spec` is the rule as iptables-save prints it."""

    chain: str
    spec: str


def hooks(spec: RuleSpec) -> list[Hook]:
    """The jumps the configuration asks for, in order."""
    guards: list[Hook] = []
    if spec.mode == "forward":
        pairs = [(("FORWARD", spec.came_in(name)), ("FORWARD", spec.goes_out(name)))
                 for name in spec.interfaces]
        guards = [Hook("PREROUTING", f"{spec.came_in(name)} -j "
                                     f"{PORT_GUARD if name in spec.bridge_ports else GUARD}")
                  for name in spec.interfaces]
    elif spec.interfaces:
        pairs = [(("INPUT", f"-i {name}"), ("OUTPUT", f"-o {name}"))
                 for name in spec.interfaces]
    else:
        pairs = [(("INPUT", "! -i lo"), ("OUTPUT", "! -o lo"))]
    # The counting jumps go first: a queued packet's verdict ends the chain.
    return seen(spec) + guards + [Hook(chain, f"{match} -j {target}")
                                  for pair in pairs
                                  for (chain, match), target in zip(pair, (TO_SERVER, FROM_SERVER))]


def seen(spec: RuleSpec) -> list[Hook]:
    """Jumps that count each SMTP connection opening through this host, whatever
    its interface (the jump's own counter; the chain is empty): against the
    openings that reach the queue, they show mail the rules do not see."""
    # lo is never queued: local sessions (a monitoring check) are not mail the rules missed
    chain, where = ("FORWARD", "") if spec.mode == "forward" else ("INPUT", "! -i lo ")
    return [Hook(chain, f"{where}-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport "
                        f"--dports {listed} -j {SEEN}")
            for listed in _port_lists(spec.smtp_ports)]


def _port_lists(ports: Sequence[int]) -> list[str]:
    """`ports` as multiport lists, at most MULTIPORT_MAX a rule."""
    return [",".join(map(str, ports[i:i + MULTIPORT_MAX])) for i in range(0, len(ports), MULTIPORT_MAX)]


def _template(name: str) -> Template:
    return Template((TEMPLATE_DIR / name).read_text(encoding="ascii"))


def _queue_target(spec: RuleSpec, bypass: bool) -> str:
    if spec.workers == 1:
        target = f"--queue-num {spec.queue}"
    else:
        target = f"--queue-balance {spec.queue}:{spec.queue + spec.workers - 1}"
    return target + (" --queue-bypass" if bypass else "")


def _pure_acks(chain: str, family: Family) -> str:
    """RETURN for pure ACKs, matched exactly: only ACK set, and a packet length that
    leaves no room for a payload once u32 has fixed the IP and TCP header lengths
    (IPv4: IHL 5 and not a fragment; IPv6: TCP right after the fixed header).

    Written as iptables-save prints it, so that what is installed reads back the same."""
    if family is IPV4:
        ip_header, doff_at = 20, 32
        ip_checks = [(0, 22, 0x3C, 20), (4, 0, 0x3FFF, 0)]  # IHL * 4 == 20; MF, offset 0
    else:
        ip_header, doff_at = 40, 52
        ip_checks = [(4, 8, 0xFF, 6)]  # the fixed header's next header: TCP
    return "\n".join(
        f"-A {chain} -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK "
        f"-m length --length {ip_header + 4 * doff} "
        f'-m u32 --u32 "{_u32([*ip_checks, (doff_at, 28, None, doff)])}" '
        f"-m statistic --mode random --probability {1 - 1 / PURE_ACKS_QUEUED:.11f} -j RETURN"
        for doff in PURE_ACK_DOFFS)


def _u32(tests: Sequence[tuple[int, int, int | None, int]]) -> str:
    """u32 tests ANDed: (offset, right shift, mask or None, value), in iptables-save's spelling."""
    return "&&".join(f"{offset:#x}" + (f">>{shift:#x}" if shift else "")
                     + ("" if mask is None else f"&{mask:#x}") + f"={value:#x}"
                     for offset, shift, mask, value in tests)


def max_segment(family: Family) -> int:
    """The MSS whose segments fit the queue's copy range: the IP and TCP
    headers without options (the sender leaves room for its options)."""
    return MAX_COPY_RANGE - (20 if family is IPV4 else 40) - 20


def _drop(spec: RuleSpec) -> str:
    """What our rules do with a packet they refuse: DROP, or in monitor mode
    RETURN (it goes on to the host's rules, as with no gate; the counters
    still count it)."""
    return "DROP" if spec.enforce else "RETURN"


def _queue_chain(chain: str, target: str, family: Family, spec: RuleSpec) -> str:
    return _template("queue-chain.rules.in").substitute(
        chain=chain, queue=target, drop=_drop(spec), inject_mark=hex(INJECT_MARK),
        inject_mask=hex(INJECT_MASK), bypass=hex(BYPASS_MARK),
        mss=max_segment(family), pure_acks=_pure_acks(chain, family))


def _dispatch(chain: str, option: str, spec: RuleSpec, skip: str | None = None) -> str:
    """Port dispatch into the protocol chains; in mode "forward", packets whose
    `skip` interface (-o for TO_SERVER, -i for FROM_SERVER) is a client one
    go back first: they travel between clients, not to or from our servers,
    and a "server" packet from a client interface is a spoof."""
    lines = []
    if skip is not None and spec.mode == "forward":
        match = spec.goes_out if skip == "-o" else spec.came_in
        lines += [f"-A {chain} {match(name)} -j RETURN" for name in spec.interfaces]
    for ports, target in ((spec.smtp_ports, SMTP_CHAIN), (spec.pop3_ports, MAILBOX_CHAIN),
                          (spec.imap_ports, MAILBOX_CHAIN)):
        for listed in _port_lists(ports):
            lines.append(f"-A {chain} -p tcp -m multiport --{option} {listed} -j {target}")
    return "\n".join(lines)


def _mail_ports(spec: RuleSpec) -> list[str]:
    return _port_lists((*spec.smtp_ports, *spec.pop3_ports, *spec.imap_ports))


def _guard(spec: RuleSpec) -> str:
    """Mode "forward": a packet from a mail server's port that came in on a
    routed client interface, from an address not routed back through it, is a spoof."""
    if spec.mode != "forward" or not set(spec.interfaces) - set(spec.bridge_ports):
        return ""
    return "\n".join(f"-A {GUARD} -p tcp -m multiport --sports {listed} -m rpfilter --invert "
                     f"-j {_drop(spec)}" for listed in _mail_ports(spec))


def _port_guard(spec: RuleSpec) -> str:
    """A client bridge port shares its subnet with the servers, so rpfilter passes
    anything there. Conntrack knows better: mark each mail connection a client
    port opens; a packet of its reply direction (the server's side) that comes
    in on a client port is forged. Replies to the servers' own outgoing mail
    belong to connections opened on the server side, and pass."""
    if not spec.bridge_ports:
        return ""
    mark = f"{CLIENT_OPENED_MARK:#x}"
    return "\n".join(
        [f"-A {PORT_GUARD} -p tcp -m multiport --dports {listed} -m conntrack --ctstate NEW "
         f"-j CONNMARK --set-xmark {mark}/{mark}" for listed in _mail_ports(spec)]
        + [f"-A {PORT_GUARD} -p tcp -m multiport --sports {listed} -m conntrack --ctdir REPLY "
           f"-m connmark --mark {mark}/{mark} -j {_drop(spec)}" for listed in _mail_ports(spec)])


def _hook_changes(wanted: Sequence[Hook], present: Sequence[Hook]) -> list[str]:
    """-D for stale or duplicate jumps, -I at the top for missing ones (in `wanted` order)."""
    lines = []
    seen: set[Hook] = set()
    for hook in present:
        if hook in seen or hook not in wanted:
            lines.append(f"-D {hook.chain} {hook.spec}")
        seen.add(hook)
    missing = [hook for hook in wanted if hook not in seen]
    # Inserting at 1 in reverse leaves them at the top in the order asked for.
    lines.extend(f"-I {hook.chain} 1 {hook.spec}" for hook in reversed(missing))
    return lines


def render(spec: RuleSpec, family: Family = IPV4, present: Sequence[Hook] = ()) -> str:
    """The iptables-restore --noflush input that installs `spec`.

    `present` are the jumps into our chains found on the host (see `parse_save`);
    only the difference to `hooks(spec)` is written.
    """
    pop3_policy = ("and IMAP fail open: with no daemon bound to the queue the kernel accepts "
                   "the packet (--queue-bypass)." if spec.pop3_fail_open else
                   "and IMAP fail closed, as configured: with no daemon the kernel drops the packet.")
    smtp_policy = ("fails closed: with no daemon bound to the queue the kernel drops the packet."
                   if spec.enforce else
                   "fails open in monitor mode (enforce = false): with no daemon bound to the "
                   "queue the kernel accepts the packet (--queue-bypass).")
    text = _template("sapd-nfq.rules.in").substitute(
        family=family.name, restore=family.restore,
        to_server=TO_SERVER, from_server=FROM_SERVER, smtp=SMTP_CHAIN, pop3=MAILBOX_CHAIN,
        to_server_rules=_dispatch(TO_SERVER, "dports", spec, skip="-o"),
        from_server_rules=_dispatch(FROM_SERVER, "sports", spec, skip="-i"),
        guard=GUARD, guard_rules=_guard(spec),
        port_guard=PORT_GUARD, port_guard_rules=_port_guard(spec), seen=SEEN,
        smtp_policy=smtp_policy,
        smtp_rules=_queue_chain(SMTP_CHAIN, _queue_target(spec, bypass=not spec.enforce), family,
                                spec),
        pop3_policy=pop3_policy,
        pop3_rules=_queue_chain(MAILBOX_CHAIN, _queue_target(spec, bypass=spec.pop3_fail_open),
                                family, spec),
        hooks="\n".join(_hook_changes(hooks(spec), present)),
    )
    return "".join(line + "\n" for line in text.splitlines() if line)


def render_removal(present: Sequence[Hook], present_chains: Iterable[str]) -> str | None:
    """The restore input that deletes the `present` jumps and our chains among
    `present_chains`; None when there is nothing of ours."""
    found = set(present_chains)
    chains = [chain for chain in CHAINS if chain in found]
    if not present and not chains:
        return None
    lines = [f"*{TABLE}"]
    lines += [f"-D {hook.chain} {hook.spec}" for hook in present]
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)


# --- Reading iptables-save (pure) --------------------------------------------------

@dataclass(frozen=True)
class SavedRule:
    chain: str
    spec: str
    position: int
    packets: int | None
    bytes: int | None

    @property
    def target(self) -> str | None:
        """The chain or target this rule jumps (-j) or goes (-g) to."""
        try:
            words = shlex.split(self.spec)
        except ValueError:  # unbalanced quotes: not from iptables-save, read it plainly
            words = self.spec.split()
        for flag, value in zip(words, words[1:]):
            if flag in ("-j", "-g"):
                return value
        return None


@dataclass(frozen=True)
class SavedTable:
    chains: tuple[str, ...]
    rules: tuple[SavedRule, ...]

    def jumps(self) -> list[SavedRule]:
        """Every rule outside our chains that jumps into one of them."""
        return [rule for rule in self.rules
                if rule.target in CHAINS and rule.chain not in CHAINS]

    def hooks(self) -> list[Hook]:
        return [Hook(rule.chain, rule.spec) for rule in self.jumps()]

    def smtp_opens(self) -> dict[str, int]:
        """SMTP connections opening through this host on any interface ("host",
        the SEEN jumps' counters) and into the queue ("queued", the SMTP chain's
        counting rule); with iptables-save -c, else zeros."""
        return {"host": sum(rule.packets or 0 for rule in self.jumps() if rule.target == SEEN),
                "queued": sum(rule.packets or 0 for rule in self.rules
                              if rule.chain == SMTP_CHAIN and rule.target is None)}


_RULE = re.compile(r"(?:\[(\d+):(\d+)\] )?-A (\S+) ?(.*)")


def parse_save(text: str, table: str = TABLE) -> SavedTable:
    """The chains and rules of `table` in iptables-save output (with or without -c)."""
    chains: list[str] = []
    rules: list[SavedRule] = []
    positions: dict[str, int] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
        elif current != table:
            continue
        elif line.startswith(":"):
            chains.append(line[1:].split(" ", 1)[0])
        elif match := _RULE.fullmatch(line):
            packets, octets, chain, spec = match.groups()
            positions[chain] = positions.get(chain, 0) + 1
            rules.append(SavedRule(chain, spec, positions[chain],
                                   None if packets is None else int(packets),
                                   None if octets is None else int(octets)))
    return SavedTable(tuple(chains), tuple(rules))


# --- Running the commands ---------------------------------------------------------

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def run_local(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command here, capturing its output; failure is the caller's to judge."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                          check=False, timeout=COMMAND_TIMEOUT)


def netns_runner(name: str, runner: Runner = run_local) -> Runner:
    """A runner that runs each command inside network namespace `name`."""
    def run(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return runner(["ip", "netns", "exec", name, *argv], stdin)
    return run


def _run(runner: Runner, argv: Sequence[str], stdin: str | None = None) -> str:
    try:
        result = runner(argv, stdin)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RulesError(f"{shlex.join(argv)}: {exc}") from exc
    if result.returncode != 0:
        message = result.stderr.strip() or "no message"
        raise RulesError(f"{shlex.join(argv)} failed (exit {result.returncode}): "
                         f"{message}{_failed_line(result.stderr, stdin)}")
    return result.stdout


def _failed_line(stderr: str, stdin: str | None) -> str:
    """The restore input line iptables-restore complains about, quoted."""
    match = re.search(r"line (\d+)", stderr)
    if stdin is None or match is None:
        return ""
    lines = stdin.splitlines()
    number = int(match.group(1))
    return f"\n  line {number}: {lines[number - 1]}" if 0 < number <= len(lines) else ""


def _saved(runner: Runner, family: Family, counters: bool = False) -> SavedTable:
    argv = [family.save, "-t", TABLE] + (["-c"] if counters else [])
    return parse_save(_run(runner, argv))


def _restore(runner: Runner, family: Family, text: str) -> None:
    # --wait last: it takes an optional argument, and would swallow a file name.
    _run(runner, [family.restore, "--noflush", "--wait"], text)


# --- The three operations -----------------------------------------------------------

def install(spec: RuleSpec, runner: Runner = run_local,
            families: Sequence[Family] = FAMILIES) -> None:
    """Install or update the rules, one atomic transaction per family; idempotent."""
    for family in families:
        _restore(runner, family, render(spec, family, _saved(runner, family).hooks()))


def update(spec: RuleSpec, runner: Runner = run_local,
           families: Sequence[Family] = FAMILIES) -> list[str]:
    """Install `spec` in the families where our chains are already installed
    (a reload switching `enforce`); returns their names. A family without our
    rules is left alone: the daemon does not install what `up` did not."""
    updated = []
    for family in families:
        table = _saved(runner, family)
        if SMTP_CHAIN in table.chains:
            _restore(runner, family, render(spec, family, table.hooks()))
            updated.append(family.name)
    return updated


def remove(runner: Runner = run_local, families: Sequence[Family] = FAMILIES) -> None:
    """Delete our jumps and our chains, one transaction per family; nothing else is touched."""
    for family in families:
        table = _saved(runner, family)
        text = render_removal(table.hooks(), table.chains)
        if text is not None:
            _restore(runner, family, text)


def installed(runner: Runner = run_local,
              families: Sequence[Family] = FAMILIES) -> dict[str, dict[str, Any]]:
    """What is in place, per family, for `status`.

    {"ipv4": {"installed": bool,      # all our chains and at least one jump
              "chains": [names present],
              "hooks": [{"chain", "position", "rule", "packets", "bytes"}],
              "rules": [{"chain", "rule", "packets", "bytes"}],
              "smtp_opens": {"host", "queued"}}, ...}
    A hook whose position is not 1 has rules ahead of it that see mail first.
    """
    report = {}
    for family in families:
        table = _saved(runner, family, counters=True)
        chains = [chain for chain in CHAINS if chain in table.chains]
        jumps = table.jumps()
        report[family.name] = {
            "installed": len(chains) == len(CHAINS) and bool(jumps),
            "chains": chains,
            "hooks": [{"chain": rule.chain, "position": rule.position, "rule": rule.spec,
                       "packets": rule.packets, "bytes": rule.bytes} for rule in jumps],
            "rules": [{"chain": rule.chain, "rule": rule.spec,
                       "packets": rule.packets, "bytes": rule.bytes}
                      for rule in table.rules if rule.chain in CHAINS],
            "smtp_opens": table.smtp_opens(),
        }
    return report
