"""The rule installer without iptables: rendered text, plans, parsing, error reporting."""

from __future__ import annotations

import re
import subprocess
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sapd_nfq.engine.errors import ConfigError
from sapd_nfq.kernel import interfaces, rules
from sapd_nfq.kernel.marks import BYPASS_MARK, INJECT_MARK, INJECT_MASK
from sapd_nfq.kernel.rules import (
    CHAINS,
    CLIENT_OPENED_MARK,
    FROM_SERVER,
    GUARD,
    IPV4,
    IPV6,
    MAILBOX_CHAIN,
    PORT_GUARD,
    SEEN,
    SMTP_CHAIN,
    TO_SERVER,
    Hook,
    RulesError,
    RuleSpec,
)
from sapd_nfq.wiring.config import Config

EXPECTED_RULES = """\
*mangle
:SAPD_NFQ_TO_SERVER - [0:0]
:SAPD_NFQ_FROM_SERVER - [0:0]
:SAPD_NFQ_SMTP - [0:0]
:SAPD_NFQ_POP3 - [0:0]
:SAPD_NFQ_GUARD - [0:0]
:SAPD_NFQ_PORT_GUARD - [0:0]
:SAPD_NFQ_SEEN - [0:0]
-A SAPD_NFQ_TO_SERVER -p tcp -m multiport --dports 25,587 -j SAPD_NFQ_SMTP
-A SAPD_NFQ_TO_SERVER -p tcp -m multiport --dports 110 -j SAPD_NFQ_POP3
-A SAPD_NFQ_TO_SERVER -p tcp -m multiport --dports 143 -j SAPD_NFQ_POP3
-A SAPD_NFQ_FROM_SERVER -p tcp -m multiport --sports 25,587 -j SAPD_NFQ_SMTP
-A SAPD_NFQ_FROM_SERVER -p tcp -m multiport --sports 110 -j SAPD_NFQ_POP3
-A SAPD_NFQ_FROM_SERVER -p tcp -m multiport --sports 143 -j SAPD_NFQ_POP3
-A SAPD_NFQ_SMTP -m mark --mark 0x5a9d0000/0xffff0000 -j RETURN
-A SAPD_NFQ_SMTP -m mark --mark 0x1000/0x1000 -j CONNMARK --save-mark --nfmask 0x1000 --ctmask 0x1000
-A SAPD_NFQ_SMTP -m mark --mark 0x1000/0x1000 -j RETURN
-A SAPD_NFQ_SMTP -m connmark --mark 0x1000/0x1000 -j RETURN
-A SAPD_NFQ_SMTP -m conntrack --ctstate INVALID -j DROP
-A SAPD_NFQ_SMTP -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 65491
-A SAPD_NFQ_SMTP -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK -m length --length 40 \
-m u32 --u32 "0x0>>0x16&0x3c=0x14&&0x4&0x3fff=0x0&&0x20>>0x1c=0x5" \
-m statistic --mode random --probability 0.93750000000 -j RETURN
-A SAPD_NFQ_SMTP -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK -m length --length 52 \
-m u32 --u32 "0x0>>0x16&0x3c=0x14&&0x4&0x3fff=0x0&&0x20>>0x1c=0x8" \
-m statistic --mode random --probability 0.93750000000 -j RETURN
-A SAPD_NFQ_SMTP -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN
-A SAPD_NFQ_SMTP -j NFQUEUE --queue-balance 4:5
-A SAPD_NFQ_POP3 -m mark --mark 0x5a9d0000/0xffff0000 -j RETURN
-A SAPD_NFQ_POP3 -m mark --mark 0x1000/0x1000 -j CONNMARK --save-mark --nfmask 0x1000 --ctmask 0x1000
-A SAPD_NFQ_POP3 -m mark --mark 0x1000/0x1000 -j RETURN
-A SAPD_NFQ_POP3 -m connmark --mark 0x1000/0x1000 -j RETURN
-A SAPD_NFQ_POP3 -m conntrack --ctstate INVALID -j DROP
-A SAPD_NFQ_POP3 -p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 65491
-A SAPD_NFQ_POP3 -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK -m length --length 40 \
-m u32 --u32 "0x0>>0x16&0x3c=0x14&&0x4&0x3fff=0x0&&0x20>>0x1c=0x5" \
-m statistic --mode random --probability 0.93750000000 -j RETURN
-A SAPD_NFQ_POP3 -p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK -m length --length 52 \
-m u32 --u32 "0x0>>0x16&0x3c=0x14&&0x4&0x3fff=0x0&&0x20>>0x1c=0x8" \
-m statistic --mode random --probability 0.93750000000 -j RETURN
-A SAPD_NFQ_POP3 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN
-A SAPD_NFQ_POP3 -j NFQUEUE --queue-balance 4:5 --queue-bypass
-I OUTPUT 1 ! -o lo -j SAPD_NFQ_FROM_SERVER
-I INPUT 1 ! -i lo -j SAPD_NFQ_TO_SERVER
-I INPUT 1 ! -i lo -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport --dports 25,587 -j SAPD_NFQ_SEEN
COMMIT
"""


def rule_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#")]


def chain_rules(text: str, chain: str) -> list[str]:
    return [line.split(" ", 2)[2] for line in text.splitlines()
            if line.startswith(f"-A {chain} ")]


def hook_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if line.startswith(("-I ", "-D ")) or
            (line.startswith("-A ") and line.split()[1] not in CHAINS)]


# --- The rendered rule set ----------------------------------------------------------

def test_representative_rule_set_exactly():
    spec = RuleSpec(mode="input", smtp_ports=[587, 25], pop3_ports=[110],
                    queue=4, workers=2, pop3_fail_open=True)
    text = rules.render(spec, IPV4)
    assert "\n".join(rule_lines(text)) + "\n" == EXPECTED_RULES
    assert text.startswith("# sapd-nfq rules for ipv4")


def test_families_differ_only_in_the_comments_the_pure_ack_headers_and_the_mss():
    spec = RuleSpec()
    v4, v6 = rules.render(spec, IPV4), rules.render(spec, IPV6)
    assert v4.count("--set-mss 65491") == v6.count("--set-mss 65471") == 2  # 65531 less headers
    pure_ack = re.compile(r"--length \d+ -m u32 --u32 \"[^\"]*\"|--set-mss \d+")
    assert ([pure_ack.sub("", line) for line in rule_lines(v4)]
            == [pure_ack.sub("", line) for line in rule_lines(v6)])
    assert rule_lines(v4) != rule_lines(v6)
    assert "ip6tables-restore --noflush" in v6


@pytest.mark.parametrize("family, lengths, checks", [
    # IHL * 4 == 20 (no IP options); MF clear and offset 0 (not a fragment)
    (IPV4, (40, 52), ("0x0>>0x16&0x3c=0x14", "0x4&0x3fff=0x0", "0x20>>0x1c=")),
    # the fixed header's next header is TCP (no extension headers)
    (IPV6, (60, 72), ("0x4>>0x8&0xff=0x6", "0x34>>0x1c=")),
], ids=["ipv4", "ipv6"])
def test_only_an_empty_ack_with_known_header_lengths_goes_by(family, lengths, checks):
    text = rules.render(RuleSpec(), family)
    for chain in (SMTP_CHAIN, MAILBOX_CHAIN):
        returns = [rule for rule in chain_rules(text, chain) if "-m u32" in rule]
        assert len(returns) == 2
        for rule, length, doff in zip(returns, lengths, (5, 8)):
            # every header length fixed, so the packet length leaves no octet for data
            assert rule.startswith("-p tcp -m tcp --tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK "
                                   f"-m length --length {length} ")
            u32 = rule.split('--u32 "')[1].split('"')[0].split("&&")
            assert u32 == [*checks[:-1], f"{checks[-1]}{doff:#x}"]
            assert length == (20 if family is IPV4 else 40) + 4 * doff
            assert rule.endswith("-m statistic --mode random --probability 0.93750000000 -j RETURN")


SPECS = [
    RuleSpec(mode=mode, smtp_ports=smtp, pop3_ports=pop3, interfaces=ifaces,
             queue=queue, workers=workers, pop3_fail_open=fail_open)
    for mode, ifaces in (("input", ()), ("input", ("eth0",)), ("input", ("eth0", "ppp+")),
                         ("forward", ("eth1",)), ("forward", ("wan0", "wan1")))
    for smtp, pop3 in (((25,), (110,)), ((25, 465, 587), (110, 995)), ((25,), ()),
                       (tuple(range(2000, 2020)), (110,)))
    for queue, workers in ((0, 1), (7, 3))
    for fail_open in (True, False)
]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
@pytest.mark.parametrize("family", [IPV4, IPV6], ids=lambda f: f.name)
def test_rule_set_structure(spec, family):
    text = rules.render(spec, family)
    lines = rule_lines(text)
    assert lines[0] == "*mangle" and lines[-1] == "COMMIT"
    assert [line for line in lines if line.startswith(":")] == [f":{c} - [0:0]" for c in CHAINS]
    # Our chains never accept on the host's behalf: they return, queue or drop INVALID.
    assert " ACCEPT" not in text


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_dispatch_picks_client_packets_by_dport_and_server_packets_by_sport(spec):
    text = rules.render(spec)
    for chain, option, skip in ((TO_SERVER, "--dports", "-o"), (FROM_SERVER, "--sports", "-i")):
        by_target = {SMTP_CHAIN: [], MAILBOX_CHAIN: []}
        found = chain_rules(text, chain)
        # Mode "forward": first, what goes between client interfaces goes back.
        returns = [f"{skip} {name} -j RETURN" for name in spec.interfaces] if spec.mode == "forward" else []
        assert found[:len(returns)] == returns
        for rule in found[len(returns):]:
            words = rule.split()
            assert words[:5] == ["-p", "tcp", "-m", "multiport", option]
            ports = words[5].split(",")
            assert len(ports) <= rules.MULTIPORT_MAX
            by_target[words[-1]] += map(int, ports)
        # IMAP shares the POP3 chain
        assert by_target == {SMTP_CHAIN: list(spec.smtp_ports),
                             MAILBOX_CHAIN: [*spec.pop3_ports, *spec.imap_ports]}


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_queue_chains_check_marks_then_invalid_then_pure_acks_then_count_then_queue(spec):
    text = rules.render(spec)
    for chain, bypass in ((SMTP_CHAIN, False), (MAILBOX_CHAIN, spec.pop3_fail_open)):
        body = chain_rules(text, chain)
        assert body[0] == f"-m mark --mark {INJECT_MARK:#x}/{INJECT_MASK:#x} -j RETURN"
        assert [rule.split(" -j ")[1] for rule in body[1:4]] == [
            f"CONNMARK --save-mark --nfmask {BYPASS_MARK:#x} --ctmask {BYPASS_MARK:#x}",
            "RETURN", "RETURN"]
        assert body[3].startswith(f"-m connmark --mark {BYPASS_MARK:#x}/{BYPASS_MARK:#x}")
        assert body[4] == "-m conntrack --ctstate INVALID -j DROP"
        # segments that fit the copy range: 65531 less the IPv4 and TCP headers
        assert body[5] == "-p tcp -m tcp --tcp-flags SYN,RST SYN -j TCPMSS --set-mss 65491"
        # after INVALID: conntrack has checked a pure ACK's window before it goes by
        assert all("--tcp-flags FIN,SYN,RST,PSH,ACK,URG ACK" in rule and rule.endswith("-j RETURN")
                   for rule in body[6:8])
        # a rule with no target counts the connections opening into the queue
        assert body[8] == "-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN"
        assert len(body) == 10 and body[9].startswith("-j NFQUEUE ")
        assert body[9].endswith(" --queue-bypass") is bypass
        if spec.workers == 1:
            assert f"--queue-num {spec.queue}" in body[9]
        else:
            assert f"--queue-balance {spec.queue}:{spec.queue + spec.workers - 1}" in body[9]


def test_smtp_never_bypasses_the_queue_when_enforcing_even_when_pop3_fails_open():
    for fail_open in (True, False):
        text = rules.render(RuleSpec(pop3_fail_open=fail_open))
        assert "--queue-bypass" not in chain_rules(text, SMTP_CHAIN)[-1]
        assert "# SMTP fails closed" in text


def test_in_monitor_mode_smtp_fails_open_like_pop3():
    for fail_open in (True, False):
        text = rules.render(RuleSpec(pop3_fail_open=fail_open, enforce=False))
        assert chain_rules(text, SMTP_CHAIN)[-1].endswith(" --queue-bypass")
        assert "# SMTP fails open in monitor mode" in text
        # nothing our rules meet is dropped: INVALID goes on to the host's own rules
        assert all(rule.endswith("--ctstate INVALID -j RETURN")
                   for rule in text.splitlines() if "INVALID" in rule and rule.startswith("-A"))
        assert " -j DROP" not in text
    forward = rules.render(RuleSpec(mode="forward", interfaces=("eth1",), enforce=False))
    assert "-m rpfilter --invert -j RETURN" in forward and " -j DROP" not in forward


def test_update_installs_only_where_the_rules_are():
    calls = []

    def runner(argv, stdin=None):
        calls.append(argv[0])
        saved = "*mangle\n:SAPD_NFQ_SMTP - [0:0]\nCOMMIT\n" if argv[0] == "ip6tables-save" else ""
        return subprocess.CompletedProcess(argv, 0, saved, "")

    assert rules.update(RuleSpec(enforce=False), runner) == ["ipv6"]
    assert calls == ["iptables-save", "ip6tables-save", "ip6tables-restore"]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_hooks_always_keep_loopback_out(spec):
    for hook in interface_hooks(spec):
        words = hook.spec.split()
        assert words[0] in ("-i", "-o", "!")
        if words[0] == "!":
            assert words[1:3] in (["-i", "lo"], ["-o", "lo"])
        else:
            assert words[1] in spec.interfaces
    for line in hook_lines(rules.render(spec)):
        assert " lo " not in line or "! -i lo" in line or "! -o lo" in line


@pytest.mark.parametrize("mode,ifaces,expected", [
    ("input", (), [("INPUT", "! -i lo", TO_SERVER), ("OUTPUT", "! -o lo", FROM_SERVER)]),
    ("input", ("eth0", "eth1"), [("INPUT", "-i eth0", TO_SERVER), ("OUTPUT", "-o eth0", FROM_SERVER),
                                 ("INPUT", "-i eth1", TO_SERVER), ("OUTPUT", "-o eth1", FROM_SERVER)]),
    ("forward", ("wan0",), [("PREROUTING", "-i wan0", GUARD),
                            ("FORWARD", "-i wan0", TO_SERVER), ("FORWARD", "-o wan0", FROM_SERVER)]),
])
def test_hooks_per_mode(mode, ifaces, expected):
    got = interface_hooks(RuleSpec(mode=mode, interfaces=ifaces))
    assert got == [Hook(chain, f"{match} -j {target}") for chain, match, target in expected]


def interface_hooks(spec: RuleSpec) -> list[Hook]:
    """The hooks but the counting jumps into SEEN, which take every interface."""
    hooks, seen = rules.hooks(spec), rules.seen(spec)
    assert hooks[:len(seen)] == seen  # first: an accepted packet goes no further in its chain
    return hooks[len(seen):]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_smtp_openings_are_counted_on_every_interface_of_the_mode_s_hook(spec):
    seen = rules.seen(spec)
    assert {hook.chain for hook in seen} == {"FORWARD" if spec.mode == "forward" else "INPUT"}
    listed = [int(port) for hook in seen
              for port in hook.spec.split("--dports ")[1].split()[0].split(",")]
    assert listed == list(spec.smtp_ports)
    for hook in seen:  # a SYN alone, on every interface but lo: the jump's counter is the count
        where = "" if spec.mode == "forward" else "! -i lo "
        assert hook.spec.startswith(f"{where}-p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport")
        assert hook.spec.count("-i ") == len(where) // len("! -i lo ") and " -o " not in hook.spec
        assert hook.spec.endswith(f"-j {SEEN}")
    assert chain_rules(rules.render(spec), SEEN) == []


def test_missing_hooks_go_on_top_in_the_order_asked_for():
    spec = RuleSpec(mode="forward", interfaces=("a0", "b0"))
    inserted = [line for line in rules.render(spec).splitlines() if line.startswith("-I ")]
    assert inserted == [
        "-I FORWARD 1 -o b0 -j SAPD_NFQ_FROM_SERVER", "-I FORWARD 1 -i b0 -j SAPD_NFQ_TO_SERVER",
        "-I FORWARD 1 -o a0 -j SAPD_NFQ_FROM_SERVER", "-I FORWARD 1 -i a0 -j SAPD_NFQ_TO_SERVER",
        "-I PREROUTING 1 -i b0 -j SAPD_NFQ_GUARD", "-I PREROUTING 1 -i a0 -j SAPD_NFQ_GUARD",
        "-I FORWARD 1 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport --dports 25 -j SAPD_NFQ_SEEN",
    ]  # each goes in at position 1, so the last written ends up first: a0 in, a0 out, b0 ...


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_installing_over_itself_writes_no_hook_changes(spec):
    assert hook_lines(rules.render(spec, present=rules.hooks(spec))) == []


def test_a_changed_configuration_converges():
    old = interface_hooks(RuleSpec(mode="input"))
    foreign_order = [old[1], old[0], old[0]]  # reordered and one duplicated by hand
    text = rules.render(RuleSpec(mode="forward", interfaces=("eth0",)), present=foreign_order)
    assert hook_lines(text) == [
        "-D OUTPUT ! -o lo -j SAPD_NFQ_FROM_SERVER",
        "-D INPUT ! -i lo -j SAPD_NFQ_TO_SERVER",
        "-D INPUT ! -i lo -j SAPD_NFQ_TO_SERVER",
        "-I FORWARD 1 -o eth0 -j SAPD_NFQ_FROM_SERVER",
        "-I FORWARD 1 -i eth0 -j SAPD_NFQ_TO_SERVER",
        "-I PREROUTING 1 -i eth0 -j SAPD_NFQ_GUARD",
        "-I FORWARD 1 -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport --dports 25 -j SAPD_NFQ_SEEN",
    ]


@pytest.mark.parametrize("spec", SPECS, ids=repr)
def test_forward_mode_drops_spoofed_server_packets_before_routing(spec):
    """A client can send packets with a server's address and port; on a
    gateway they are dropped in PREROUTING (rpfilter: the source is routed
    elsewhere), before the kernel forwards or answers them."""
    guard = chain_rules(rules.render(spec), GUARD)
    if spec.mode == "input":
        assert guard == []  # OUTPUT sees only what this host sends
        return
    ports = [*spec.smtp_ports, *spec.pop3_ports, *spec.imap_ports]
    listed = []
    for rule in guard:
        words = rule.split()
        assert words[:5] == ["-p", "tcp", "-m", "multiport", "--sports"]
        assert words[6:] == ["-m", "rpfilter", "--invert", "-j", "DROP"]
        listed += map(int, words[5].split(","))
    assert listed == ports
    assert [h.spec for h in rules.hooks(spec) if h.chain == "PREROUTING"] == [
        f"-i {name} -j {GUARD}" for name in spec.interfaces]


def test_a_duplicated_hook_is_reduced_to_one():
    wanted = rules.hooks(RuleSpec())
    text = rules.render(RuleSpec(), present=[*wanted, wanted[0]])
    assert hook_lines(text) == [f"-D INPUT {wanted[0].spec}"]


def test_mark_constants_do_not_overlap():
    assert INJECT_MARK & ~INJECT_MASK == 0
    assert BYPASS_MARK & INJECT_MASK == 0
    assert bin(BYPASS_MARK).count("1") == 1


# --- Validation ---------------------------------------------------------------------

# The config file's keys are checked by wiring/config.py (tests/test_config.py);
# a RuleSpec checks only what it pastes into rules, and what the rules need.
@pytest.mark.parametrize("kwargs,key", [
    ({"mode": "forward"}, "interfaces:"),
    ({"interfaces": ("lo",)}, "interfaces:"),
    ({"interfaces": ("l+",)}, "interfaces:"),
    ({"interfaces": ("lo+",)}, "interfaces:"),
    ({"interfaces": ("+",)}, "interfaces:"),
    ({"interfaces": ("",)}, "interfaces:"),
    ({"interfaces": ("a" * 16,)}, "interfaces:"),
    ({"interfaces": ("eth0 -j ACCEPT",)}, "interfaces:"),
    ({"interfaces": ("eth0\n-I INPUT 1 -j ACCEPT",)}, "interfaces:"),
    ({"interfaces": ("-x",)}, "interfaces:"),
    ({"interfaces": ("eth/0",)}, "interfaces:"),
    ({"interfaces": ("eth0@if5",)}, "interfaces:"),
])
def test_bad_configuration_names_its_key(kwargs, key):
    with pytest.raises(ConfigError) as info:
        RuleSpec(**kwargs)
    assert str(info.value).startswith(key)


def test_ports_are_sorted_and_interfaces_kept_once():
    spec = RuleSpec(smtp_ports=(587, 25), pop3_ports=(110,), interfaces=("eth0", "eth0"))
    assert spec == RuleSpec(smtp_ports=(25, 587), interfaces=("eth0",))
    hash(spec)


def test_from_config_takes_the_rule_keys():
    config = Config(mode="forward", smtp_ports=(25, 587), interfaces=("wan0",), queue=3,
                    workers=2, pop3_fail_open=False, auth_ttl=60)
    assert RuleSpec.from_config(config) == RuleSpec(
        mode="forward", smtp_ports=(25, 587), pop3_ports=(110,), interfaces=("wan0",),
        queue=3, workers=2, pop3_fail_open=False)
    assert RuleSpec.from_config(Config.default()) == RuleSpec()


def test_long_prefix_names_and_common_names_are_accepted():
    RuleSpec(interfaces=("enp0s31f6", "wlp2s0.100", "br-1a2b3c4d5e6f", "ppp+", "l2tp+"))


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=20))
def test_any_interface_name_is_refused_or_stays_inside_its_hooks(name):
    try:
        spec = RuleSpec(interfaces=(name,))
    except ConfigError:
        return
    assert [hook.spec.split()[1] for hook in interface_hooks(spec)] == [name, name]
    text = rules.render(spec)
    assert len(hook_lines(text)) == 3
    assert text.count(name) >= 2 and not any(c.isspace() for c in name)


# --- Reading iptables-save ---------------------------------------------------------

SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
[3:180] -A INPUT -j SAPD_NFQ_TO_SERVER
COMMIT
*mangle
:PREROUTING ACCEPT [10:600]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:SAPD_NFQ_SMTP - [0:0]
:SAPD_NFQ_TO_SERVER - [0:0]
[1:2] -A INPUT -p udp -j MARK --set-xmark 0x1/0xffffffff
[7:420] -A INPUT ! -i lo -j SAPD_NFQ_TO_SERVER
[0:0] -A OUTPUT -m comment --comment "not -j SAPD_NFQ_SMTP" -j ACCEPT
[0:0] -A OUTPUT -o eth0 -g SAPD_NFQ_FROM_SERVER
[5:300] -A SAPD_NFQ_SMTP -j NFQUEUE --queue-num 0
[6:360] -A SAPD_NFQ_TO_SERVER -p tcp -m multiport --dports 25 -j SAPD_NFQ_SMTP
COMMIT
"""


def test_parse_save_reads_the_one_table_with_counters_and_positions():
    table = rules.parse_save(SAVE)
    assert table.chains == ("PREROUTING", "INPUT", "OUTPUT", SMTP_CHAIN, TO_SERVER)
    assert [(r.chain, r.position, r.packets, r.bytes) for r in table.rules] == [
        ("INPUT", 1, 1, 2), ("INPUT", 2, 7, 420), ("OUTPUT", 1, 0, 0), ("OUTPUT", 2, 0, 0),
        (SMTP_CHAIN, 1, 5, 300), (TO_SERVER, 1, 6, 360)]
    # The quoted comment is not a jump; a goto into our chain is.
    assert table.hooks() == [Hook("INPUT", "! -i lo -j SAPD_NFQ_TO_SERVER"),
                             Hook("OUTPUT", "-o eth0 -g SAPD_NFQ_FROM_SERVER")]


def test_parse_save_without_counters():
    table = rules.parse_save("*mangle\n:INPUT ACCEPT [0:0]\n-A INPUT ! -i lo -j SAPD_NFQ_TO_SERVER\n"
                             "COMMIT\n")
    assert table.rules[0].packets is None
    assert table.hooks() == [Hook("INPUT", "! -i lo -j SAPD_NFQ_TO_SERVER")]


def test_render_removal_deletes_jumps_then_flushes_then_deletes_chains():
    table = rules.parse_save(SAVE)
    assert rules.render_removal(table.hooks(), table.chains) == (
        "*mangle\n"
        "-D INPUT ! -i lo -j SAPD_NFQ_TO_SERVER\n"
        "-D OUTPUT -o eth0 -g SAPD_NFQ_FROM_SERVER\n"
        "-F SAPD_NFQ_TO_SERVER\n-F SAPD_NFQ_SMTP\n"
        "-X SAPD_NFQ_TO_SERVER\n-X SAPD_NFQ_SMTP\n"
        "COMMIT\n")
    assert rules.render_removal([], ["INPUT", "OTHER"]) is None


# --- The operations against a recorded iptables --------------------------------------

class FakeIptables:
    """Answers *-save with a fixed text, records every command and restore input."""

    def __init__(self, save_text: str = "", fail: tuple[int, str] | None = None):
        self.save_text = save_text
        self.fail = fail
        self.calls: list[tuple[list[str], str | None]] = []

    def __call__(self, argv, stdin=None):
        self.calls.append((list(argv), stdin))
        if self.fail and "restore" in argv[0]:
            return subprocess.CompletedProcess(argv, self.fail[0], "", self.fail[1])
        out = self.save_text if "save" in argv[0] else ""
        return subprocess.CompletedProcess(argv, 0, out, "")


EMPTY_MANGLE = "*mangle\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def test_install_reads_then_restores_each_family_in_one_transaction():
    fake = FakeIptables(EMPTY_MANGLE)
    spec = RuleSpec()
    rules.install(spec, runner=fake)
    assert [argv for argv, _ in fake.calls] == [
        ["iptables-save", "-t", "mangle"], ["iptables-restore", "--noflush", "--wait"],
        ["ip6tables-save", "-t", "mangle"], ["ip6tables-restore", "--noflush", "--wait"]]
    assert fake.calls[1][1] == rules.render(spec, IPV4)
    assert fake.calls[3][1] == rules.render(spec, IPV6)


def test_install_does_not_add_hooks_that_are_there():
    spec = RuleSpec()
    present = "".join(f"-A {hook.chain} {hook.spec}\n" for hook in rules.hooks(spec))
    fake = FakeIptables(f"*mangle\n:INPUT ACCEPT [0:0]\n{present}COMMIT\n")
    rules.install(spec, runner=fake, families=[IPV4])
    assert hook_lines(fake.calls[1][1]) == []


def test_remove_touches_nothing_when_nothing_is_installed():
    fake = FakeIptables(EMPTY_MANGLE)
    rules.remove(runner=fake)
    assert [argv[0] for argv, _ in fake.calls] == ["iptables-save", "ip6tables-save"]


def test_installed_reports_chains_hooks_and_counters():
    report = rules.installed(runner=FakeIptables(SAVE), families=[IPV4])
    assert report["ipv4"]["installed"] is False  # FROM_SERVER and POP3 are missing
    assert report["ipv4"]["chains"] == [TO_SERVER, SMTP_CHAIN]
    assert report["ipv4"]["hooks"][0] == {"chain": "INPUT", "position": 2, "packets": 7,
                                          "bytes": 420, "rule": "! -i lo -j SAPD_NFQ_TO_SERVER"}
    assert {"chain": SMTP_CHAIN, "rule": "-j NFQUEUE --queue-num 0", "packets": 5,
            "bytes": 300} in report["ipv4"]["rules"]


def test_a_restore_error_carries_stderr_and_the_failing_line():
    fake = FakeIptables(EMPTY_MANGLE, fail=(2, "iptables-restore: line 3 failed\n"))
    with pytest.raises(RulesError) as info:
        rules.install(RuleSpec(), runner=fake, families=[IPV4])
    message = str(info.value)
    assert message.startswith("iptables-restore --noflush --wait failed (exit 2): "
                              "iptables-restore: line 3 failed")
    assert message.endswith("line 3: " + fake.calls[1][1].splitlines()[2])


def test_a_missing_command_is_a_rules_error():
    def runner(argv, stdin=None):
        raise FileNotFoundError(2, "No such file or directory", argv[0])
    with pytest.raises(RulesError, match="iptables-save -t mangle -c: .*No such file"):
        rules.installed(runner=runner)


def test_netns_runner_prefixes_ip_netns_exec():
    fake = FakeIptables()
    rules.netns_runner("lab1", fake)(["iptables-save"], "x")
    assert fake.calls == [(["ip", "netns", "exec", "lab1", "iptables-save"], "x")]


# --- interfaces.validate without the kernel -----------------------------------------

def test_validate_names_the_missing_interface():
    with pytest.raises(ConfigError, match=r"interfaces: no interface named 'eth9' \(present: eth0, lo\)"):
        interfaces.validate(["eth0", "eth9"], available=["lo", "eth0"])


@pytest.mark.parametrize("name", ["lo", "l+", "+", "bad name"])
def test_validate_refuses_loopback_and_garbage(name):
    with pytest.raises(ConfigError, match="interfaces:"):
        interfaces.validate([name], available=["lo", "eth0", "bad name"])


def test_validate_accepts_prefixes_of_absent_interfaces():
    interfaces.validate(["ppp+", "eth0"], available=["lo", "eth0"])



# --- A client port of a bridge ------------------------------------------------------

BRIDGED = RuleSpec(mode="forward", interfaces=("c1", "wan0"), bridge_ports=("c1",),
                   smtp_ports=(25,), pop3_ports=(110,), imap_ports=(143,))


def test_a_bridge_port_is_matched_by_physdev_and_a_routed_interface_by_name():
    assert interface_hooks(BRIDGED) == [
        Hook("PREROUTING", f"-m physdev --physdev-in c1 -j {PORT_GUARD}"),
        Hook("PREROUTING", f"-i wan0 -j {GUARD}"),
        Hook("FORWARD", f"-m physdev --physdev-in c1 -j {TO_SERVER}"),
        Hook("FORWARD", f"-m physdev --physdev-out c1 --physdev-is-bridged -j {FROM_SERVER}"),
        Hook("FORWARD", f"-i wan0 -j {TO_SERVER}"),
        Hook("FORWARD", f"-o wan0 -j {FROM_SERVER}"),
    ]


def test_on_a_bridge_port_only_the_port_tells_the_server_s_packets_from_a_client_s():
    text = rules.render(BRIDGED)
    # between client ports, or "from the server" but in on a client port: not queued
    assert chain_rules(text, TO_SERVER)[:2] == [
        "-m physdev --physdev-out c1 --physdev-is-bridged -j RETURN", "-o wan0 -j RETURN"]
    assert chain_rules(text, FROM_SERVER)[:2] == [
        "-m physdev --physdev-in c1 -j RETURN", "-i wan0 -j RETURN"]


def test_the_port_guard_marks_client_opened_mail_connections_and_drops_their_forged_replies():
    mark = f"{CLIENT_OPENED_MARK:#x}/{CLIENT_OPENED_MARK:#x}"
    assert chain_rules(rules.render(BRIDGED), PORT_GUARD) == [
        "-p tcp -m multiport --dports 25,110,143 -m conntrack --ctstate NEW "
        f"-j CONNMARK --set-xmark {mark}",
        "-p tcp -m multiport --sports 25,110,143 -m conntrack --ctdir REPLY "
        f"-m connmark --mark {mark} -j DROP",
    ]
    # its own bit, clear of the bypass bit the queue chains save to the connection
    assert CLIENT_OPENED_MARK & BYPASS_MARK == 0 and CLIENT_OPENED_MARK & INJECT_MASK == 0


def test_rpfilter_guards_only_routed_client_interfaces():
    only_ports = RuleSpec(mode="forward", interfaces=("c1",), bridge_ports=("c1",))
    assert chain_rules(rules.render(only_ports), GUARD) == []
    assert chain_rules(rules.render(RuleSpec(mode="forward", interfaces=("eth0",))), PORT_GUARD) == []


@pytest.mark.parametrize("kwargs,message", [
    ({"mode": "forward", "interfaces": ("eth0",), "bridge_ports": ("c1",)}, "not named in interfaces"),
    ({"mode": "forward", "interfaces": ("c+",), "bridge_ports": ("c+",)}, "not named in interfaces"),
    ({"mode": "input", "interfaces": ("c1",), "bridge_ports": ("c1",)}, "only in mode 'forward'"),
])
def test_bridge_ports_must_be_named_client_interfaces_of_a_gateway(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RuleSpec(**kwargs)


def test_from_config_takes_the_bridge_ports_from_the_host_not_the_config():
    config = replace(Config.default(), mode="forward", interfaces=("c1", "wan0"),
                     smtp_ports=(25,), pop3_ports=(110,), imap_ports=(143,))
    assert RuleSpec.from_config(config).bridge_ports == ()
    assert RuleSpec.from_config(config, bridge_ports=["c1"]) == BRIDGED


def test_smtp_openings_are_read_from_the_saved_counters():
    saved = rules.parse_save(
        "*mangle\n"
        f"[12:720] -A FORWARD -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m multiport --dports 25 -j {SEEN}\n"
        f"[5:300] -A {SMTP_CHAIN} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN\n"
        f"[40:9000] -A {SMTP_CHAIN} -j NFQUEUE --queue-num 0\n"
        f"[3:180] -A {MAILBOX_CHAIN} -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN\n"
        "COMMIT\n")
    assert saved.smtp_opens() == {"host": 12, "queued": 5}


class _Message(dict):
    """A netlink message as Debian 12's pyroute2 (0.7.2) gives it: header fields as keys,
    attributes by get_attr alone."""

    def __init__(self, attrs: dict, **header: object) -> None:
        super().__init__(header)
        self.attrs = attrs

    def get_attr(self, name: str, default: object = None) -> object:
        return self.attrs.get(name, default)


class _IPRoute:
    """pyroute2.IPRoute as 0.7.2 has it: no `netns` argument."""

    def __init__(self) -> None:
        pass

    def __enter__(self) -> _IPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def get_links(self) -> list[_Message]:
        return [_Message({"IFLA_IFNAME": "eth0"}, index=2), _Message({"IFLA_IFNAME": "lo"}, index=1)]

    def route(self, command: str, family: int) -> list[_Message]:
        return [_Message({"RTA_OIF": 2}, dst_len=0, type=1, table=254)]


def test_interfaces_are_read_as_debian_12s_pyroute2_gives_them(monkeypatch):
    import pyroute2

    monkeypatch.setattr(pyroute2, "IPRoute", _IPRoute)
    assert interfaces.list_interfaces() == ["lo", "eth0"]
    assert interfaces.default_route_interfaces() == ["eth0"]
    interfaces.validate(["eth0"])
