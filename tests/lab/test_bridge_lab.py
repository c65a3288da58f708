"""A gateway that bridges: gw joins its links in br0, client and server share a subnet.

The lab's BRIDGED layout: the client's packets to the server cross gw at layer 2,
entering iptables (through br_netfilter) as `-i br0`, their port only in the
physdev match. The gate is configured as on a routed gateway, with the port
clients come in on (`interfaces = ["to-client"]`).

Each attack first runs on the bare bridge, where it gets through (the lab's
Postfix relays for every lab client; a forged server reply reaches the client),
then through the gate: the relay table in both families, forged server replies
(dropped by the port guard, and by the daemon when the rules let one by), a few
hostile TCP tricks; then the configurations whose rules would see nothing, which
`up` and `run` refuse, and `status` showing mail that crosses the host unqueued.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from socket import AF_INET, AF_INET6

import pytest
import test_forged_lab as forged
from lab_gate import (
    EXTERNAL,
    LOCAL,
    Gate,
    PostfixLog,
    assert_relay_refused,
    assert_relayed,
    external,
    pop3_login,
    relay_denied,
    require_lab,
    send_mail,
    stop_and_check,
)

# raw_quiet: the hostile suite's fixture, here over this module's bridged lab
from test_hostile_lab import EVERYWHERE, FAMILIES, RAW, Target, pool, raw_quiet, run_trick  # noqa: F401

from sapd_nfq.kernel import rules
from sapd_nfq.kernel.rules import FROM_SERVER, PORT_GUARD

pytestmark = pytest.mark.lab

FAMILY = [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")]
PORT = "to-client"  # the bridge port clients come in on
TRICKS = [t for t in EVERYWHERE if t.id in ("data-ahead-of-a-gap", "overlap-with-other-bytes",
                                            "ip-fragments", "tiny-segments")]


@pytest.fixture(scope="module")
def _bridge_session() -> Iterator[tuple]:
    require_lab()
    from sapd_nfq.lab import BRIDGED, Lab, MailServer

    prefix = os.environ.get("SAPD_LAB_PREFIX", "sapd") + "-br"
    with Lab(prefix=prefix, layout=BRIDGED) as lab, MailServer(lab) as mail:
        yield lab, mail


# These take the place of conftest's routed lab for every test and fixture here.
@pytest.fixture(scope="module")
def lab(_bridge_session):
    return _bridge_session[0]


@pytest.fixture(scope="module")
def mail_server(_bridge_session):
    return _bridge_session[1]


@pytest.fixture(scope="module")
def _pools(lab):
    # the raw-TCP address (RAW) has its kernel RSTs silenced: the rest are the clients'
    every = tuple(range(len(lab.client.pool_ipv4)))
    return {family: itertools.cycle([a for a in pool(lab, family, every)
                                     if a not in pool(lab, family, RAW)])
            for family in FAMILIES}


@pytest.fixture(scope="module")
def bridge_gate(lab, mail_server, tmp_path_factory) -> Iterator[Gate]:
    """sapd-nfq on the bridging gw, for the tests that leave its rules as they are."""
    gate = Gate(lab, tmp_path_factory.mktemp("bridge-gate"), "forward", interfaces=[PORT])
    gate.up()
    gate.start()
    yield gate
    problems = stop_and_check(gate, mail_server)
    assert not problems, "\n".join(problems) + "\n" + gate.log()


@pytest.fixture
def gate_alone(bridge_gate) -> Iterator[None]:
    """bridge_gate stopped and its rules out, for a test that runs a gate of its own
    in gw (a namespace holds one rule set and one daemon per queue)."""
    bridge_gate.stop()
    bridge_gate.down()
    yield
    bridge_gate.up()
    bridge_gate.start()


@pytest.fixture
def hairpin(lab) -> Iterator[None]:
    """The client port sends frames back out where they came from (as a wireless
    access point's port or a VEPA does): the client can address a forgery to itself
    across the bridge."""
    lab.run("gw", ["ip", "link", "set", PORT, "type", "bridge_slave", "hairpin", "on"])
    yield
    lab.run("gw", ["ip", "link", "set", PORT, "type", "bridge_slave", "hairpin", "off"])


@pytest.fixture
def to_itself(monkeypatch, hairpin) -> None:
    """Forged frames go to the client's own MAC (reflected by the hairpin port),
    not to the gateway's (which routes them back)."""
    real = forged._mac
    monkeypatch.setattr(forged, "_mac", lambda lab, host, ifname:
                        real(lab, "client", "to-gw") if host == "gw" else real(lab, host, ifname))


PATHS = [pytest.param(False, id="routed-back"), pytest.param(True, id="hairpin")]


@pytest.fixture
def path(request):
    if request.param:
        request.getfixturevalue("to_itself")
    return request.param


def port_guard_drops(gate: Gate, family: int) -> int:
    _, status = gate.status()
    table = status["rules"]["ipv6" if family == AF_INET6 else "ipv4"]
    # its DROP rule: the first one marks every mail connection a client opens
    return sum(r["packets"] for r in table["rules"]
               if r["chain"] == PORT_GUARD and r["rule"].endswith("-j DROP"))


# --- the bare bridge: what the gate is for ------------------------------------------

@pytest.mark.parametrize("family", FAMILY)
def test_without_the_gate_a_relay_crosses_the_bridge(lab, mail_server, fresh, family):
    assert_relayed(lab, mail_server, fresh(family), lab.server.address(family), LOCAL, external())


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("family", FAMILY)
def test_without_the_gate_a_forged_pop3_ok_reaches_the_client(lab, mail_server, fresh, family, path):
    source, server = fresh(family), lab.server.address(family)
    assert forged.forge_pop3_login(lab, family, source, server) == b"+OK Logged in.\r\n"


@pytest.mark.usefixtures("raw_quiet")
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("trick", TRICKS)
def test_without_the_gate_a_trick_relays(lab, mail_server, trick, family):
    run_trick(lab, mail_server, Target("bare", None), trick, family)


# --- through the gate ----------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY)
def test_the_relay_table_through_the_bridge(lab, mail_server, bridge_gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    postfix = PostfixLog(mail_server)
    assert send_mail(lab, source, server, EXTERNAL, "bob@lab.example", "inbound") is None  # row 1
    postfix.wait_for(r"to=<bob@lab\.example>.*status=sent")
    assert_relay_refused(lab, mail_server, bridge_gate, source, server, LOCAL, external())  # row 3
    pop3_login(lab, mail_server, source, server)
    bridge_gate.wait_for_log(rf"LOGIN client={re.escape(source)} .*user=alice")
    assert_relay_refused(lab, mail_server, bridge_gate, source, server, EXTERNAL, external())  # row 4
    assert_relayed(lab, mail_server, source, server, LOCAL, external())  # row 2


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("family", FAMILY)
def test_the_port_guard_drops_a_forged_pop3_ok(lab, mail_server, bridge_gate, fresh, family, path):
    source, server = fresh(family), lab.server.address(family)
    before = port_guard_drops(bridge_gate, family)
    assert forged.forge_pop3_login(lab, family, source, server).startswith(b"-ERR")
    assert port_guard_drops(bridge_gate, family) > before
    forged.no_login(bridge_gate, source)


@pytest.mark.parametrize("family", FAMILY)
def test_the_port_guard_drops_a_forged_354(lab, mail_server, bridge_gate, fresh, family):
    source, server = fresh(family), lab.server.address(family)
    after_data, after_rcpt = forged.forge_smtp_354(lab, family, source, server)
    assert after_data.startswith(b"554"), after_data  # the server's own answer
    assert relay_denied(after_rcpt), after_rcpt


def test_status_counts_smtp_openings_through_the_bridge_and_into_the_queue(lab, bridge_gate, fresh):
    for family in (AF_INET, AF_INET6):
        send_mail(lab, fresh(family), lab.server.address(family), EXTERNAL, "bob@lab.example", "count")
    code, status = bridge_gate.status()
    assert code == 0 and status["blind"] == [], status["blind"]
    for family in ("ipv4", "ipv6"):
        opens = status["rules"][family]["smtp_opens"]
        assert opens["queued"] >= 1 and opens["host"] >= opens["queued"], opens
    text = bridge_gate.cli("status").stdout
    assert "smtp:     connections opened through this host / into the queue: ipv4 " in text, text
    spoofs = {name: port_guard_drops(bridge_gate, family) for family, name in FAMILIES.items()}
    print(f"\nbridge: {text.splitlines()[1].split(': ', 1)[1]}; spoofs dropped by the port guard {spoofs}")


@pytest.mark.parametrize("family", FAMILY)
def test_the_daemon_drops_a_forgery_by_its_bridge_port(lab, mail_server, gate_alone, make_gate, fresh,
                                                       family, to_itself):
    """With the port guard and the rules' port check taken out, a forgery reflected
    by a hairpin port reaches the queue as the server's: the daemon knows the port it
    came in on (physindev) and drops it."""
    gate = make_gate("forward", interfaces=[PORT])
    tables = "ip6tables" if family == AF_INET6 else "iptables"
    for rule in (["PREROUTING", "-m", "physdev", "--physdev-in", PORT, "-j", PORT_GUARD],
                 [FROM_SERVER, "-m", "physdev", "--physdev-in", PORT, "-j", "RETURN"]):
        lab.run("gw", [tables, "-t", "mangle", "-D", *rule])
    source, server = fresh(family), lab.server.address(family)
    assert forged.forge_pop3_login(lab, family, source, server).startswith(b"-ERR")
    assert forged.counter(gate, "wrong_direction") >= 1
    forged.no_login(gate, source)


@pytest.mark.usefixtures("raw_quiet")
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("trick", TRICKS)
def test_a_trick_relays_nothing_through_the_bridge(lab, mail_server, bridge_gate, trick,
                                                   family):
    run_trick(lab, mail_server, Target("forward", bridge_gate), trick, family)


# --- rules that would see nothing -------------------------------------------------------

@pytest.fixture
def bridge_calls_off(lab, request) -> Iterator[str]:
    """One of gw's bridge-nf-call sysctls set to 0 while the test runs."""
    key = f"net.bridge.bridge-nf-call-{request.param}"
    lab.run("gw", ["sysctl", "-qw", f"{key}=0"])
    yield key
    lab.run("gw", ["sysctl", "-qw", f"{key}=1"])


@pytest.mark.parametrize("bridge_calls_off", ["iptables", "ip6tables"], indirect=True)
def test_a_bridge_without_netfilter_calls_runs_blind_and_the_gate_refuses_it(
        lab, mail_server, fresh, tmp_path, bridge_calls_off):
    family = AF_INET6 if "ip6tables" in bridge_calls_off else AF_INET
    gate = Gate(lab, tmp_path, "forward", interfaces=[PORT])
    # What the gate would face: the rules in place, nothing bound to the queue (so
    # SMTP they saw would be dropped), and the relay still crosses the bridge.
    runner = rules.netns_runner(lab.gw.netns)
    rules.install(rules.RuleSpec(mode="forward", interfaces=(PORT,), bridge_ports=(PORT,)), runner)
    try:
        assert_relayed(lab, mail_server, fresh(family), lab.server.address(family), LOCAL, external())
    finally:
        rules.remove(runner)
    for command in ("up", "run"):
        done = gate.cli(command, check=False)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert "never reaches iptables" in done.stderr and f"sysctl -w {bridge_calls_off}=1" in done.stderr
    assert "SAPD_NFQ" not in lab.run("gw", ["iptables-save", "-t", "mangle"], capture_output=True,
                                     text=True).stdout


@pytest.mark.parametrize("interfaces,message", [
    (["br0"], "every interface of this host is on the client side"),
    (["to-client", "to-server"], "every port of the bridge 'br0' is named"),
])
def test_a_client_side_that_takes_in_the_servers_is_refused(lab, mail_server, tmp_path, interfaces,
                                                           message):
    gate = Gate(lab, tmp_path, "forward", interfaces=interfaces)
    for command in ("up", "run"):
        done = gate.cli(command, check=False)
        assert done.returncode == 2 and message in done.stderr, (command, done.stderr)


def test_status_shows_mail_crossing_the_host_that_never_reaches_the_queue(
        lab, mail_server, gate_alone, make_gate, fresh):
    # The servers' port named as the clients': nothing a client sends meets the queue.
    gate = make_gate("forward", interfaces=["to-server"])
    assert send_mail(lab, fresh(), lab.server.ipv4, EXTERNAL, "bob@lab.example", "unseen") is None
    code, status = gate.status()
    assert code == 3, status
    assert any("none of them into the queue" in problem for problem in status["blind"]), status
    assert "BLIND:    ipv4: " in gate.cli("status", check=False).stdout
