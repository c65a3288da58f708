"""A site's first day, on live traffic: logins that cover a client's network,
and decision lines an administrator can match with the MTA's log.

- An IPv6 client with privacy addresses reads its mail from one address of
  its /64 and sends from another: with the default `ipv6_login_prefix` (64,
  set here: the lab's gates key logins by address, lab_gate.py)
  the relay passes; a client of another /64 is still refused; with 128,
  the login covers its own address alone.
- A message Postfix queued: the PASS line of its recipient and a QUEUED line
  with Postfix's queue id share the client's and the server's address and
  port, and Postfix's own log names the same queue id (Sendmail's form:
  test_sendmail_lab.py).
"""

from __future__ import annotations

import re
from socket import AF_INET, AF_INET6

import pytest
from lab_gate import LOCAL, PostfixLog, external, pop3_login, raw_transaction, try_rcpt

pytestmark = pytest.mark.lab

MODES = ("forward", "input")


@pytest.mark.parametrize("mode", MODES)
def test_a_login_covers_the_clients_ipv6_network(lab, mail_server, make_gate, fresh, mode):
    gate = make_gate(mode, ipv6_login_prefix=64)  # the default; the lab's gates use 128
    server = lab.server.address(AF_INET6)
    reader, sender = fresh(AF_INET6), fresh(AF_INET6)       # one /64: the lab's pool
    other = lab.client.address(AF_INET6)                     # another /64
    pop3_login(lab, mail_server, reader, server)
    gate.wait_for_log(rf"LOGIN client={reader} ")
    assert try_rcpt(lab, sender, server, LOCAL, external()) is None
    refused = try_rcpt(lab, other, server, LOCAL, external())
    assert refused is not None and refused.code == 550, refused
    why = gate.cli("why", sender).stdout
    assert "logged in as alice" in why and "2001:db8:3::/64" in why


@pytest.mark.parametrize("mode", MODES)
def test_at_prefix_128_a_login_covers_its_address_alone(lab, mail_server, make_gate, fresh, mode):
    gate = make_gate(mode, ipv6_login_prefix=128)
    server = lab.server.address(AF_INET6)
    reader, sender = fresh(AF_INET6), fresh(AF_INET6)
    pop3_login(lab, mail_server, reader, server)
    gate.wait_for_log(rf"LOGIN client={reader} ")
    refused = try_rcpt(lab, sender, server, LOCAL, external())
    assert refused is not None and refused.code == 550, refused
    assert try_rcpt(lab, reader, server, LOCAL, external()) is None


def decision_lines(gate, client: str) -> dict[str, dict[str, str]]:
    """The last PASS and QUEUED lines of `client`, as their key=value pairs."""
    found = {}
    for line in gate.log_lines():
        match = re.search(r" (PASS|QUEUED) (client=(\S+) .*)$", line)
        if match and match[3] == client:
            found[match[1]] = dict(re.findall(r"(\w+)=('[^']*'|\S+)", match[2]))
    return found


@pytest.mark.parametrize("family", [pytest.param(AF_INET, id="ipv4"), pytest.param(AF_INET6, id="ipv6")])
def test_the_decision_log_names_postfixs_queue_id(lab, mail_server, make_gate, fresh, family):
    gate = make_gate("forward")
    source, server = fresh(family), lab.server.address(family)
    postfix = PostfixLog(mail_server)
    replies = raw_transaction(lab, family, source, server, "carol@external.example",
                              ["bob@lab.example"], "queue-id")
    queued = re.match(rb"250 2\.0\.0 Ok: queued as (\w+)", replies[-2])
    assert queued, replies
    queue_id = queued[1].decode()
    gate.wait_for_log(rf"QUEUED client={re.escape(source)} ")
    lines = decision_lines(gate, source)
    ends = ("client", "client_port", "server", "server_port")
    assert [lines["PASS"][k] for k in ends] == [lines["QUEUED"][k] for k in ends]
    assert lines["QUEUED"]["server"] == server and lines["QUEUED"]["server_port"] == "25"
    assert lines["QUEUED"]["queue_id"] == queue_id
    postfix.wait_for(rf"postfix/smtpd\[\d+\]: {queue_id}: client=\S+\[{re.escape(source)}\]")
