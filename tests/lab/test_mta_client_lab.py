"""A real MTA as the client: Postfix on the client host relays through the gateway.

The sending Postfix (provision/client-mta.sh: its own instance and queue,
relayhost = [198.18.2.2]) must read sapd-nfq's refusal as a permanent
failure: the message bounces (status=bounced, "said: 550 Log in.") and is not
deferred for retries. After a POP3 login from the client's address the same
relay goes through.

Set SAPD_LAB_VAGRANT to the vagrant/ directory to run this against the VMs
(provisioned and running); otherwise it runs in the namespace lab.
"""

from __future__ import annotations

import os
import shutil

import pytest
from lab_gate import relay_denied

from sapd_nfq.lab import lab_users
from sapd_nfq.lab.client_mta import ClientMTA
from sapd_nfq.lab.gate import Gate

pytestmark = pytest.mark.lab

VAGRANT = os.environ.get("SAPD_LAB_VAGRANT")
AUTH_TTL = 60  # seconds: ample for a login followed by one relay
SENDER = "alice@lab.example"
OUTSIDE = "dave@external.example"


@pytest.fixture(scope="module")
def stage(request):
    """(lab, gate, client MTA): on the VMs of $SAPD_LAB_VAGRANT, else sapd-nfq and the
    client MTA started in the session's namespace lab for this module."""
    if VAGRANT:
        from sapd_nfq.lab.vagrant import VagrantLab

        missing = [tool for tool in ("vagrant", "ssh") if shutil.which(tool) is None]
        if missing:
            pytest.fail(f"SAPD_LAB_VAGRANT is set but {', '.join(missing)} is missing")
        with VagrantLab(VAGRANT) as lab:
            yield lab, lab.gate(), lab.client_mta()
    else:
        lab = request.getfixturevalue("lab")
        with Gate(lab, auth_ttl=AUTH_TTL) as gate, ClientMTA(lab) as mta:
            yield lab, gate, mta


def _logged_out(gate: Gate, address: str) -> None:
    gate.cli("auth", "del", address, check=False)


def test_a_refused_relay_is_a_permanent_failure_at_the_sending_mta(stage):
    lab, gate, mta = stage
    _logged_out(gate, lab.client.ipv4)
    gate_offset = gate.log_size()

    offset = mta.send(SENDER, OUTSIDE, "relay without a login")
    status = mta.wait_for_status(OUTSIDE, offset)

    assert f"relay={lab.server.ipv4}[{lab.server.ipv4}]:25" in status
    assert "status=bounced" in status and relay_denied(status), status
    log = mta.log_since(offset)
    assert not any("status=deferred" in line for line in log), log
    fails = [line for line in gate.wait_for_log("FAIL", gate_offset) if " FAIL " in line]
    assert len(fails) == 1
    assert f" client={lab.client.ipv4} " in fails[0]
    assert f" sender='{SENDER}' recipient='{OUTSIDE}' row='row 3" in fails[0]

    # The sender learns of it: the bounce goes back through the gate to a local mailbox.
    assert "status=sent" in mta.wait_for_status(SENDER, offset)
    passes = [line for line in gate.wait_for_log("PASS", gate_offset) if " PASS " in line]
    assert f"sender='' recipient='{SENDER}' row='row 1" in passes[0]


def test_after_a_pop3_login_the_sending_mta_relays(stage):
    lab, gate, mta = stage
    _logged_out(gate, lab.client.ipv4)
    gate_offset = gate.log_size()
    lab.run(lab.client, ["curl", "-sS", "--user", f"alice:{lab_users()['alice']}",
                         f"pop3://{lab.server.ipv4}/"], capture_output=True)
    gate.wait_for_log("LOGIN", gate_offset)

    offset = mta.send(SENDER, OUTSIDE, "relay after a POP3 login")
    status = mta.wait_for_status(OUTSIDE, offset)

    assert "status=sent (250 2.0.0 Ok: queued as " in status, status
    passes = [line for line in gate.wait_for_log("PASS", gate_offset) if " PASS " in line]
    assert f"user=alice sender='{SENDER}' recipient='{OUTSIDE}' row='row 2" in passes[-1]
