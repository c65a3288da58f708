"""Monitor mode (`enforce = false`) against the live daemon, in both modes of
operation and both families.

A representative subset of the hostile suite (test_hostile_lab.py), one trick
for each path that can drop, rewrite, reset or answer: a plain relay refused in
place, a conflicting overlap, a first copy lost after the gate, data on a SYN,
data ahead of a gap, urgent data, tiny segments. Each attempt must reach the
lab's Postfix exactly as in the bare lab (the trick's own assertions for "bare":
the MTA takes the RCPT), while the daemon counts it as a would-be refusal and,
where it judged the RCPT, logs a WOULD-FAIL for it. Then a reload switches to
enforcing, and the same trick is refused as the hostile suite expects. Last, a
daemon killed in monitor mode lets SMTP through: the rules fail open.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from lab_gate import Gate, PostfixLog, external, mangle_rules, stop_and_check, try_rcpt
from test_hostile_lab import (
    FAMILY,
    GATE_SETTINGS,
    SENDER,
    Attempt,
    Target,
    Trick,
    accepted_rcpts,
    after,
    gap_ahead,
    lose_first_copy,
    overlap,
    raw_quiet,  # noqa: F401  (a fixture: the raw-TCP addresses' kernel RSTs silenced)
    relay_as,
    run_trick,
    stale,
    syn_data_discarded,
    tiny_segments,
)

pytestmark = pytest.mark.lab


def plain(tcp, relay: bytes) -> None:
    tcp.send(relay)


@dataclass(frozen=True)
class Case:
    trick: Trick
    #: the would-be refusals the daemon may count for it, one at least (status: would_refuse)
    reasons: tuple[str, ...]
    #: whether the daemon reads the RCPT (it judges and logs it as WOULD-FAIL)
    judged: bool

    def __str__(self) -> str:
        return self.trick.name


CASES = [pytest.param(case, id=str(case)) for case in (
    Case(Trick("plain-relay", lambda a: relay_as(a, plain)), ("relay_denied",), True),
    Case(Trick("overlap-with-other-bytes", lambda a: relay_as(a, overlap), gated=(b"550", b"554")),
         ("relay_denied", "retransmission_differs"), False),
    Case(Trick("first-copy-lost-paws",
               lambda a: after(a, lambda tcp: lose_first_copy(tcp, tsval=stale(tcp)), timestamps=True),
               gated=(b"554",), counter="conflicts"), ("retransmission_differs",), False),
    Case(Trick("syn-data-discarded", syn_data_discarded, gated=(b"554",), counter="conflicts"),
         ("retransmission_differs",), False),
    # Passed ahead of the gap, the tail reaches Postfix before the gate reads it: the gate
    # loses the session (a WOULD-RESET: a reply to no command it saw), it judges no RCPT.
    Case(Trick("data-ahead-of-a-gap", gap_ahead, counter="held_back"), ("held_back",), False),
    Case(Trick("urgent-byte", lambda a: relay_as(a, lambda tcp, relay: tcp.send(b"X" + relay, flags="PAU", urg=1)),
               gated=(b"500",), counter="urgent_cleared"), ("urgent_cleared",), False),
    Case(Trick("tiny-segments", lambda a: relay_as(a, tiny_segments)), ("relay_denied",), True),
)]


class Watching(Target):
    """The gate in monitor mode: the attempt must go as in the bare lab."""

    @property
    def gated(self) -> bool:
        return False


def switch(gate: Gate, enforce: bool) -> None:
    """Rewrite the config's `enforce` and reload (no restart)."""
    text = re.sub(r"(?m)^enforce = .*\n", "", gate.path.read_text())
    gate.path.write_text(text + f"enforce = {'true' if enforce else 'false'}\n")
    pid = gate.pid
    gate.cli("reload")
    status = gate.control("status")
    assert status["enforce"] is enforce and status["pid"] == pid


@pytest.fixture(scope="module", params=("forward", "input"))
def gate(request, lab, mail_server, tmp_path_factory) -> Iterator[Gate]:
    gate = Gate(lab, tmp_path_factory.mktemp(f"monitor-{request.param}"), request.param,
                enforce=False, **GATE_SETTINGS)
    gate.up()
    gate.start()
    yield gate
    problems = stop_and_check(gate, mail_server)
    assert not problems, "\n".join(problems) + "\n" + gate.log()


@pytest.mark.usefixtures("raw_quiet")
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("case", CASES)
def test_monitor_mode_logs_the_refusal_and_the_mta_takes_the_rcpt(lab, mail_server, gate, case, family):
    switch(gate, enforce=False)
    before = gate.control("status")["would_refuse"]
    lines = len(gate.log_lines())
    watching = Watching(gate.config.mode, gate)
    attempt_src = Attempt(lab, watching, family).src
    run_trick(lab, mail_server, watching, case.trick, family)
    counted = gate.control("status")["would_refuse"]
    assert any(counted.get(r, 0) > before.get(r, 0) for r in case.reasons), (case.reasons, counted)
    if case.judged:
        gate.wait_for_log(rf"WOULD-FAIL client={re.escape(attempt_src)} ", after=lines)
    assert not [line for line in gate.log_lines()[lines:]
                if re.search(r"(?<!WOULD-)\b(FAIL|RESET) client=", line)]

    switch(gate, enforce=True)
    try:
        run_trick(lab, mail_server, Target(gate.config.mode, gate), case.trick, family)
    finally:
        switch(gate, enforce=False)


@pytest.mark.parametrize("family", FAMILY)
def test_a_daemon_killed_in_monitor_mode_lets_smtp_through(lab, mail_server, gate, family, fresh):
    # the reloads rewrite the installed SMTP rule: closed when enforcing, open in monitor mode
    for enforce in (True, False):
        switch(gate, enforce)
        smtp = [line for line in mangle_rules(lab, gate.host).splitlines()
                if line.startswith("-A SAPD_NFQ_SMTP -j NFQUEUE")]
        assert len(smtp) == 2 and all(line.endswith("--queue-bypass") is not enforce for line in smtp)
    source = fresh(family)
    server = lab.server.address(family)
    gate.stop(signal.SIGKILL)
    try:
        postfix = PostfixLog(mail_server)
        recipient = external()
        assert try_rcpt(lab, source, server, SENDER.decode(), recipient) is None
        assert accepted_rcpts(postfix.disconnect(source)) == 1
    finally:
        gate.start()

