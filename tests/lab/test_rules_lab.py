"""The rule installer against the real iptables, inside network namespaces of its own.

Each test gets a fresh namespace (and, for traffic, a client namespace joined
to it by a veth pair) and deletes it afterwards. Mostly no daemon is bound to
the queues, so the kernel's own verdicts show the rules at work: SMTP is
dropped (fail closed), POP3 passes (--queue-bypass), marked packets are let by.
A ten-line netfilterqueue daemon then shows the verdict contract: an accepted
packet still meets the host's filter rules, a settled flow leaves the queue.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
from pyroute2 import IPRoute, netns

from sapd_nfq.engine.errors import ConfigError
from sapd_nfq.kernel import interfaces, rules
from sapd_nfq.kernel.marks import BYPASS_MARK, INJECT_MARK
from sapd_nfq.kernel.rules import (
    CHAINS,
    IPV4,
    IPV6,
    MAILBOX_CHAIN,
    SMTP_CHAIN,
    RuleSpec,
)

pytestmark = pytest.mark.lab

SERVER4, CLIENT4 = "198.18.77.1", "198.18.77.2"
SERVER6, CLIENT6 = "2001:db8:77::1", "2001:db8:77::2"
IFA_F_NODAD = 0x02  # no duplicate address detection: the address works at once
_names = itertools.count()


def _unavailable(reason: str) -> None:
    """Skip, except in CI, where a lab that cannot run is a failure."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"lab test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module", autouse=True)
def _capable():
    if os.geteuid() != 0:
        _unavailable("needs root: creates network namespaces and runs iptables in them")
    for tool in ("ip", "iptables-restore", "ip6tables-restore", "iptables-save", "ip6tables-save"):
        if shutil.which(tool) is None:
            _unavailable(f"needs {tool} on PATH")


def _new_namespace() -> str:
    name = f"sapd-rules-{os.getpid()}-{next(_names)}"
    try:
        netns.create(name)
    except OSError as exc:
        _unavailable(f"cannot create a network namespace: {exc}")
    return name


def _delete_namespace(name: str) -> None:
    netns.remove(name)


@pytest.fixture
def ns():
    name = _new_namespace()
    try:
        yield name
    finally:
        _delete_namespace(name)


def sh(ns: str, *argv: str, stdin: str | None = None) -> str:
    result = subprocess.run(["ip", "netns", "exec", ns, *argv], input=stdin,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def snapshot(ns: str) -> str:
    """Both families' full rule sets, without the timestamps."""
    text = sh(ns, "iptables-save") + sh(ns, "ip6tables-save")
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


FOREIGN = """\
*filter
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
-A OUTPUT -o lo -j ACCEPT
COMMIT
*mangle
-A INPUT -p udp -m udp --dport 53 -j RETURN
-A PREROUTING -p udp -j MARK --set-xmark 0x1/0xffffffff
COMMIT
"""


def add_foreign_rules(ns: str) -> None:
    sh(ns, "iptables-restore", "--noflush", stdin=FOREIGN)
    sh(ns, "ip6tables-restore", "--noflush", stdin=FOREIGN)


def expected_lines(spec: RuleSpec, family: rules.Family) -> list[str]:
    """The rendered rules as iptables-save prints them once installed."""
    lines = []
    for line in rules.render(spec, family).splitlines():
        if line.startswith("-A "):
            lines.append(line)
        elif line.startswith("-I "):
            _, chain, _, spec_text = line.split(" ", 3)
            lines.append(f"-A {chain} {spec_text}")
    return lines


SPECS = [
    RuleSpec(),
    RuleSpec(mode="input", smtp_ports=(25, 465, 587), pop3_ports=(110, 995),
             interfaces=("eth0", "ppp+"), queue=3, workers=2, pop3_fail_open=False),
    RuleSpec(mode="forward", interfaces=("wan0",), smtp_ports=tuple(range(2000, 2020)), workers=3),
    RuleSpec(mode="forward", interfaces=("wan0",), enforce=False),
]


@pytest.mark.parametrize("spec", SPECS, ids=["default", "input-ifaces-balance", "forward", "monitor"])
def test_install_is_idempotent_and_remove_restores_the_host(ns, spec):
    runner = rules.netns_runner(ns)
    add_foreign_rules(ns)
    before = snapshot(ns)

    rules.install(spec, runner)
    once = snapshot(ns)
    for family in (IPV4, IPV6):
        saved = sh(ns, family.save).splitlines()
        # iptables-save prints exactly what we render: the idempotency check relies on it.
        for line in expected_lines(spec, family):
            assert line in saved
    for line in before.splitlines():
        assert line in once.splitlines()  # every foreign rule stays

    rules.install(spec, runner)
    assert snapshot(ns) == once

    rules.remove(runner)
    assert snapshot(ns) == before
    rules.remove(runner)
    assert snapshot(ns) == before


def test_hooks_go_on_top_of_existing_rules(ns):
    add_foreign_rules(ns)
    rules.install(RuleSpec(), rules.netns_runner(ns))
    for save in (sh(ns, "iptables-save", "-t", "mangle"), sh(ns, "ip6tables-save", "-t", "mangle")):
        inputs = [line for line in save.splitlines() if line.startswith("-A INPUT ")]
        assert inputs == ["-A INPUT ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport "
                          "--dports 25 -j SAPD_NFQ_SEEN",
                          "-A INPUT ! -i lo -j SAPD_NFQ_TO_SERVER",
                          "-A INPUT -p udp -m udp --dport 53 -j RETURN"]


def test_a_new_configuration_converges_to_a_fresh_install(ns):
    runner = rules.netns_runner(ns)
    add_foreign_rules(ns)
    new = RuleSpec(mode="forward", interfaces=("wan0", "wan1"), workers=2)
    rules.install(RuleSpec(interfaces=("eth0",)), runner)
    rules.install(new, runner)
    updated = snapshot(ns)
    rules.remove(runner)
    rules.install(new, runner)
    assert snapshot(ns) == updated
    ours = [line for line in updated.splitlines() if line.endswith(("_TO_SERVER", "_FROM_SERVER"))]
    assert ours and all(line.startswith("-A FORWARD ") for line in ours)


def test_installed_reports_what_is_there(ns):
    runner = rules.netns_runner(ns)
    add_foreign_rules(ns)
    for report in rules.installed(runner).values():
        assert report == {"installed": False, "chains": [], "hooks": [], "rules": [],
                          "smtp_opens": {"host": 0, "queued": 0}}
    rules.install(RuleSpec(), runner)
    report = rules.installed(runner)
    for family in ("ipv4", "ipv6"):
        assert report[family]["installed"] is True
        assert report[family]["chains"] == list(CHAINS)
        assert [(h["chain"], h["position"], h["rule"]) for h in report[family]["hooks"]] == [
            ("INPUT", 1, "! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport --dports 25 "
                         "-j SAPD_NFQ_SEEN"),
            ("INPUT", 2, "! -i lo -j SAPD_NFQ_TO_SERVER"),
            ("OUTPUT", 1, "! -o lo -j SAPD_NFQ_FROM_SERVER")]
        # IMAP adds a dispatch rule each way; the MSS clamp, pure ACKs two and an opening
        # counter in each protocol chain
        assert len(report[family]["rules"]) == 26
        assert all(isinstance(r["packets"], int) for r in report[family]["rules"])
    rules.remove(runner)
    assert not any(r["installed"] or r["chains"] for r in rules.installed(runner).values())


def test_an_iptables_error_is_reported_with_its_stderr():
    runner = rules.netns_runner(f"sapd-rules-{os.getpid()}-absent")
    with pytest.raises(rules.RulesError, match=r"iptables-save -t mangle failed \(exit \d+\): "
                                               r".*Cannot open network namespace"):
        rules.install(RuleSpec(), runner)


# --- Traffic ----------------------------------------------------------------------------

@pytest.fixture
def pair():
    """(server namespace, client namespace) joined by a veth pair, IPv4 and IPv6."""
    server, client = _new_namespace(), None
    try:
        client = _new_namespace()
        with IPRoute(netns=server) as ipr:
            ipr.link("add", ifname="srv0", kind="veth", peer={"ifname": "cli0", "net_ns_fd": client})
        for name, ifname, v4, v6 in ((server, "srv0", SERVER4, SERVER6),
                                     (client, "cli0", CLIENT4, CLIENT6)):
            with IPRoute(netns=name) as ipr:
                index = ipr.link_lookup(ifname=ifname)[0]
                ipr.addr("add", index=index, address=v4, prefixlen=24)
                ipr.addr("add", index=index, address=v6, prefixlen=64, flags=IFA_F_NODAD)
                ipr.link("set", index=index, state="up")
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        yield server, client
    finally:
        for name in (server, client):
            if name is not None:
                _delete_namespace(name)


CONNECT = textwrap.dedent("""\
    import socket, sys
    dst, port, mark, src, sport, timeout = sys.argv[1:]
    s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET)
    s.settimeout(float(timeout))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if mark != "-":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(mark))
    if src != "-":
        s.bind((src, int(sport)))
    try:
        s.connect((dst, int(port)))
        print("connected")
    except ConnectionRefusedError:
        print("refused")
    except TimeoutError:
        print("timeout")
""")


def connect(ns: str, dst: str, port: int, *, mark: int | None = None,
            src: str | None = None, sport: int | None = None, timeout: float = 0.4) -> str:
    """Try a TCP connection from namespace `ns`: "connected", "refused" or "timeout"."""
    args = [dst, str(port), "-" if mark is None else str(mark), src or "-",
            "-" if sport is None else str(sport), str(timeout)]
    return sh(ns, sys.executable, "-c", CONNECT, *args).strip()


def counters(ns: str, family: rules.Family) -> dict[tuple[str, str], int]:
    """Packet counters of our chains' rules, by (chain, rule)."""
    table = rules.parse_save(sh(ns, family.save, "-c", "-t", "mangle"))
    return {(rule.chain, rule.spec): rule.packets for rule in table.rules
            if rule.chain in rules.CHAINS}


def queued(counts: dict[tuple[str, str], int], chain: str) -> int:
    return sum(n for (c, spec), n in counts.items() if c == chain and "NFQUEUE" in spec)


def arrivals(ns: str, family: rules.Family) -> int:
    """Packets from source port 25 that reached namespace `ns` (see the counting rule)."""
    save = sh(ns, family.save, "-c", "-t", "filter")
    return sum(rule.packets for rule in rules.parse_save(save, "filter").rules
               if rule.chain == "INPUT")


@pytest.mark.parametrize("family,server,client", [(IPV4, SERVER4, CLIENT4),
                                                  (IPV6, SERVER6, CLIENT6)],
                         ids=["ipv4", "ipv6"])
def test_packets_meet_the_queue(pair, family, server, client):
    server_ns, client_ns = pair
    # Nothing listens on the server: a packet that gets through is answered by a RST.
    assert connect(client_ns, server, 25) == "refused"
    rules.install(RuleSpec(smtp_ports=(25,), pop3_ports=(110,)), rules.netns_runner(server_ns),
                  families=[family])

    # SMTP: queued, and with no daemon bound the kernel drops it. Fail closed.
    assert connect(client_ns, server, 25) == "timeout"
    after_smtp = counters(server_ns, family)
    assert queued(after_smtp, SMTP_CHAIN) >= 1
    # POP3: queued with --queue-bypass, so it passes and the server's RST comes back.
    assert connect(client_ns, server, 110) == "refused"
    after_pop3 = counters(server_ns, family)
    assert queued(after_pop3, MAILBOX_CHAIN) >= 2  # the client's SYN and the server's RST
    # IMAP: through the same chain, failing open alike.
    assert connect(client_ns, server, 143) == "refused"
    after_imap = counters(server_ns, family)
    assert queued(after_imap, MAILBOX_CHAIN) >= queued(after_pop3, MAILBOX_CHAIN) + 2
    after_pop3 = after_imap
    # Other ports never reach our queue chains.
    assert connect(client_ns, server, 80) == "refused"
    assert counters(server_ns, family) == after_pop3

    # The server side, from port 25: only its unmarked packets are queued. A
    # counting rule in the client shows what got out of the server.
    sh(client_ns, family.save.replace("-save", ""), "-A", "INPUT", "-p", "tcp", "--sport", "25")
    seen = []
    for client_port, mark in ((9, None), (10, INJECT_MARK), (11, BYPASS_MARK)):
        result = connect(server_ns, client, client_port, src=server, sport=25, mark=mark)
        seen.append((result, arrivals(client_ns, family)))
    # unmarked: dropped in the queue; injected: out (the client's RST to it is
    # queued like any reply); settled: out, and the RST is let by via the connmark.
    assert seen == [("timeout", 0), ("timeout", 1), ("refused", 2)]
    final = counters(server_ns, family)
    first_four = [n for (chain, _), n in final.items() if chain == SMTP_CHAIN][:4]
    assert all(n > 0 for n in first_four), final


# Segments sent by scapy from the client: kinds by name, each a (count, packet) recipe.
SEGMENTS = textwrap.dedent("""\
    import sys
    from scapy.all import IP, IPv6, IPv6ExtHdrDestOpt, IPOption_NOP, TCP, send
    src, dst, kind, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    v6 = ":" in dst
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    stamps = [("NOP", None), ("NOP", None), ("Timestamp", (1, 0))]
    tcp = dict(sport=40000 + len(kind), dport=25, seq=1000, ack=2000, window=512)
    make = {
        "pure-ack": lambda: ip / TCP(flags="A", **tcp),
        "pure-ack-timestamps": lambda: ip / TCP(flags="A", options=stamps, **tcp),
        # each below is a packet the pure-ACK rules must not let by
        "ack-1-byte": lambda: ip / TCP(flags="A", **tcp) / b"R",
        # no options, 12 bytes of data: the length of a pure ACK with timestamps
        "ack-12-bytes": lambda: ip / TCP(flags="A", **tcp) / b"RCPT TO:<d@x",
        "ack-timestamps-1-byte": lambda: ip / TCP(flags="A", options=stamps, **tcp) / b"R",
        "ack-ip-options": lambda: (ip / TCP(flags="A", **tcp) if v6 else
                                   IP(src=src, dst=dst, options=[IPOption_NOP()] * 4)
                                   / TCP(flags="A", **tcp)),
        "ack-ipv6-extension": lambda: (IPv6(src=src, dst=dst) / IPv6ExtHdrDestOpt()
                                       / TCP(flags="A", **tcp) if v6 else ip / TCP(flags="A", **tcp)),
        "psh-ack": lambda: ip / TCP(flags="PA", **tcp),
        "ack-urg": lambda: ip / TCP(flags="AU", urgptr=1, **tcp),
    }[kind]
    send([make() for _ in range(count)], verbose=False)
""")


def pure_ack_returns(counts: dict[tuple[str, str], int], chain: str) -> list[int]:
    """Counters of the chain's two pure-ACK RETURNs: no TCP options, then timestamps."""
    return [n for (c, spec), n in counts.items() if c == chain and "-m u32" in spec]


def invalid_drops(counts: dict[tuple[str, str], int], chain: str) -> int:
    return sum(n for (c, spec), n in counts.items() if c == chain and "INVALID" in spec)


@pytest.mark.parametrize("family,server,client", [(IPV4, SERVER4, CLIENT4),
                                                  (IPV6, SERVER6, CLIENT6)],
                         ids=["ipv4", "ipv6"])
def test_only_pure_acks_go_by_the_queue_and_one_in_sixteen_still_meets_it(pair, family, server,
                                                                          client):
    server_ns, client_ns = pair
    rules.install(RuleSpec(), rules.netns_runner(server_ns), families=[family])
    # the server's RSTs to what reaches it would be queued too: drop them before mangle
    sh(server_ns, family.save.replace("-save", ""), "-t", "raw", "-A", "OUTPUT", "-p", "tcp",
       "--sport", "25", "-j", "DROP")

    def send(kind: str, count: int) -> tuple[int, list[int], int]:
        before = counters(server_ns, family)
        sh(client_ns, sys.executable, "-c", SEGMENTS, client, server, kind, str(count))
        after = counters(server_ns, family)
        return (queued(after, SMTP_CHAIN) - queued(before, SMTP_CHAIN),
                [a - b for a, b in zip(pure_ack_returns(after, SMTP_CHAIN),
                                       pure_ack_returns(before, SMTP_CHAIN))],
                invalid_drops(after, SMTP_CHAIN) - invalid_drops(before, SMTP_CHAIN))

    # 400 each: all queued or all let by would each happen with odds below 1e-11
    for kind, rule in (("pure-ack", 0), ("pure-ack-timestamps", 1)):
        queued_now, returned, invalid = send(kind, 400)
        assert invalid == 0 and returned[1 - rule] == 0, (kind, returned, invalid)
        assert queued_now + returned[rule] == 400
        assert 0 < queued_now < 400 and 0 < returned[rule], (kind, queued_now, returned)
    lookalikes = ["ack-1-byte", "ack-12-bytes", "ack-timestamps-1-byte", "psh-ack", "ack-urg",
                  "ack-ipv6-extension" if family is IPV6 else "ack-ip-options"]
    for kind in lookalikes:
        queued_now, returned, invalid = send(kind, 32)
        assert returned == [0, 0], (kind, returned)
        assert queued_now + invalid == 32, (kind, queued_now, invalid)


DAEMON = textwrap.dedent("""\
    import sys
    from netfilterqueue import NetfilterQueue
    bypass_bit, settled_port = int(sys.argv[1]), int(sys.argv[2])

    def verdict(packet):
        data = packet.get_payload()
        tcp = (data[0] & 0x0F) * 4
        ports = int.from_bytes(data[tcp:tcp + 2], "big"), int.from_bytes(data[tcp + 2:tcp + 4], "big")
        if settled_port in ports:
            packet.set_mark(packet.get_mark() | bypass_bit)
            packet.repeat()
        else:
            packet.accept()

    queue = NetfilterQueue()
    queue.bind(0, verdict)
    print("bound", flush=True)
    queue.run()
""")


@pytest.fixture
def daemon(pair):
    """A minimal daemon in the server namespace: accepts, and settles POP3 flows."""
    pytest.importorskip("netfilterqueue")
    server_ns, _ = pair
    rules.install(RuleSpec(), rules.netns_runner(server_ns), families=[IPV4])
    process = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-c", DAEMON, str(BYPASS_MARK), "110"],
        stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        assert ready and process.stdout.readline() == "bound\n", "the test daemon did not start"
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_an_accept_verdict_still_meets_the_host_filter(pair, daemon):
    server_ns, client_ns = pair
    sh(server_ns, "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "25", "-j", "DROP")
    assert connect(client_ns, SERVER4, 25) == "timeout"
    assert queued(counters(server_ns, IPV4), SMTP_CHAIN) >= 1
    dropped = rules.parse_save(sh(server_ns, "iptables-save", "-c", "-t", "filter"), "filter")
    assert dropped.rules[0].packets >= 1  # the host's DROP saw what the daemon accepted
    sh(server_ns, "iptables", "-D", "INPUT", "-p", "tcp", "--dport", "25", "-j", "DROP")
    assert connect(client_ns, SERVER4, 25) == "refused"  # accepted both ways


def test_a_settled_flow_leaves_the_queue(pair, daemon):
    server_ns, client_ns = pair
    assert connect(client_ns, SERVER4, 110) == "refused"
    pop3 = [n for (chain, _), n in counters(server_ns, IPV4).items() if chain == MAILBOX_CHAIN]
    # inject, save bit, return on mark, return on connmark, INVALID, MSS clamp, two pure-ACK
    # RETURNs, the opening counter, NFQUEUE: the SYN had its MSS clamped, was counted and
    # queued once, came back marked, and the server's RST left by the connmark.
    assert pop3 == [0, 1, 1, 1, 0, 1, 0, 0, 1, 1]


def test_interfaces_in_a_namespace(pair):
    server_ns, _ = pair
    assert interfaces.list_interfaces(server_ns) == ["lo", "srv0"]
    assert interfaces.default_route_interfaces(server_ns) == []
    with IPRoute(netns=server_ns) as ipr:
        ipr.route("add", dst="0.0.0.0/0", gateway=CLIENT4)
        ipr.route("add", dst="::/0", gateway=CLIENT6, family=socket.AF_INET6)
    assert interfaces.default_route_interfaces(server_ns) == ["srv0"]
    interfaces.validate(["srv0", "ppp+"], netns=server_ns)
    with pytest.raises(ConfigError, match="no interface named 'eth0'"):
        interfaces.validate(["eth0"], netns=server_ns)
    with pytest.raises(ConfigError, match="loopback"):
        interfaces.validate(["lo"], netns=server_ns)
