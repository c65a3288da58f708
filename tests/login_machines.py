"""What the POP3 and IMAP machine tests share: transcripts fed every way TCP
can cut them, and the invariants both machines keep.

    from login_machines import C, S, PASSWORD, Harness

    POP3 = Harness(POP3Machine)
    POP3.assert_every_cut(steps, [LoginSucceeded("bob", "USER")], settled=True)

A transcript is a list of `(C or S, bytes)` steps. The invariants: whatever
arrives, a machine parses it or raises ProtocolError; an error pins it (every
later call raises); it emits only the events a login machine has; a settled
machine reads nothing more; the password shows up in no event, repr or error
hint.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
from streams import conversation_splits

from sapd_nfq.engine.errors import ProtocolError
from sapd_nfq.engine.events import (
    Event,
    LoginFailed,
    LoginSucceeded,
    Quit,
    StartTLSRequested,
    TLSOffered,
    TLSStarted,
)
from sapd_nfq.engine.machine import PinnedMachine

C, S = "client", "server"
Steps = Sequence[tuple[str, bytes]]

PASSWORD = "s3cr3t-Tr0ub4dor"
PLAIN_IR = base64.b64encode(b"\0bob\0" + PASSWORD.encode()).decode()
#: the password as a client may send it: plain, in AUTH PLAIN, in AUTH LOGIN
SECRETS = (PASSWORD, PLAIN_IR, base64.b64encode(PASSWORD.encode()).decode())

#: every event a POP3 or IMAP machine may emit
LOGIN_EVENTS = (LoginSucceeded, LoginFailed, TLSOffered, StartTLSRequested, TLSStarted, Quit)


def feed(machine: PinnedMachine, steps: Steps) -> list[Event]:
    events: list[Event] = []
    for side, chunk in steps:
        receive = machine.receive_client if side == C else machine.receive_server
        events += receive(chunk)
    return events


@dataclass(frozen=True)
class Harness:
    """The shared assertions, for one machine (`make(**limits)` builds one)."""

    make: Callable[..., PinnedMachine]

    def assert_every_cut(self, steps: Steps, expected: list[Event], *, settled: bool = False,
                         **limits: int) -> None:
        for cut in conversation_splits(steps):
            machine = self.make(**limits)
            assert feed(machine, cut) == expected, cut
            assert machine.settled is settled

    def assert_refused_every_cut(self, steps: Steps, **limits: int) -> None:
        """Every cut ends in ProtocolError, with no login learnt before it."""
        for cut in conversation_splits(steps):
            machine, events = self.make(**limits), []
            with pytest.raises(ProtocolError) as raised:
                for side, chunk in cut:
                    receive = machine.receive_client if side == C else machine.receive_server
                    events += receive(chunk)
            assert not any(isinstance(e, LoginSucceeded) for e in events), cut
            assert not any(s in raised.value.hint for s in SECRETS)
            with pytest.raises(ProtocolError):  # pinned
                machine.receive_server(b"\r\n")

    def assert_password_never_shown(self, steps: Steps) -> None:
        machine = self.make()
        shown = []
        for side, chunk in steps:
            shown.append(repr(machine))
            events = (machine.receive_client if side == C else machine.receive_server)(chunk)
            shown += [repr(events), str(events)]
        shown.append(repr(machine))
        assert not any(secret in text for secret in SECRETS for text in shown)

    def assert_parses_or_raises(self, steps: Steps, **limits: int) -> None:
        """Any bytes: parsed into login events, or a ProtocolError that pins
        the machine and shows no secret; a settled machine reads nothing more."""
        machine = self.make(**limits)
        failed = False
        for side, data in steps:
            receive = machine.receive_client if side == C else machine.receive_server
            try:
                events = receive(data)
            except ProtocolError as exc:
                assert not any(s in exc.hint for s in SECRETS)
                failed = True
                continue
            assert not failed, "an error must pin the machine"
            assert all(isinstance(e, LOGIN_EVENTS) for e in events)
            if machine.settled:
                assert receive(data) == []
