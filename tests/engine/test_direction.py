"""Direction comes from where a packet came in, never from its ports.

A client on a gateway's outside can put on its own link a segment with the
server's address, port and next sequence number. Its ports say "from the
server"; the binding says it came in from the client side. Every server
reply the gate acts on is tried here: each forged one is dropped, counted,
and changes nothing, while the same bytes from the server side do.
"""

from __future__ import annotations

import base64

import pytest
from engine_helpers import CLIENT4, CLIENT6, SERVER4, SERVER6, Conn, make_engine

from sapd_nfq.engine.policy import ROW_NOT_LOGGED_IN
from sapd_nfq.engine.session import Fate
from sapd_nfq.engine.verdicts import ACCEPT, BYPASS, DROP

FAMILIES = pytest.mark.parametrize("client, server", [(CLIENT4, SERVER4), (CLIENT6, SERVER6)],
                                   ids=["ipv4", "ipv6"])
RELAY = b"MAIL FROM:<alice@lab.example>\r\nRCPT TO:<dave@external.example>\r\n"


def conn(engine, client, server, sport):
    return Conn(engine, client=client, server=server, sport=sport, ingress=True)


def refused_forgery(engine, decision) -> None:
    assert decision.verdict is DROP and not decision.inject and not decision.notices
    assert engine.counters["wrong_direction"] >= 1


@FAMILIES
def test_a_forged_pop3_ok_to_pass_learns_no_login(client, server):
    engine = make_engine()
    pop = conn(engine, client, server, 110)
    pop.handshake()
    pop.server(b"+OK Dovecot ready.\r\n")
    pop.client(b"USER alice\r\n")
    pop.server(b"+OK\r\n")
    pop.client(b"PASS wrong\r\n")
    refused_forgery(engine, pop.forge(b"+OK Logged in.\r\n"))
    assert not engine.logins.entries(pop.now)
    # The real answer, from the server side, still reads in order.
    d = pop.server(b"-ERR [AUTH] Authentication failed.\r\n")
    assert [n.event for n in d.notices] == ["login-failed"]
    assert not engine.logins.entries(pop.now)


@FAMILIES
@pytest.mark.parametrize("command, challenge", [
    (b"AUTH PLAIN\r\n", b"+ \r\n"),
    (b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n", None),
])
def test_forged_pop3_sasl_steps_and_apop_learn_nothing(client, server, command, challenge):
    engine = make_engine()
    pop = conn(engine, client, server, 110)
    pop.handshake()
    pop.server(b"+OK Dovecot ready. <1896.697170952@dbc.mtview.ca.us>\r\n")
    pop.client(command)
    if challenge is not None:
        refused_forgery(engine, pop.forge(challenge))
        pop.server(challenge)
        pop.client(base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    refused_forgery(engine, pop.forge(b"+OK Logged in.\r\n"))
    assert not engine.logins.entries(pop.now)


@FAMILIES
def test_a_forged_235_to_smtp_auth_grants_no_relay(client, server):
    engine = make_engine()
    smtp = conn(engine, client, server, 25)
    smtp.smtp_greeting()
    smtp.client(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong") + b"\r\n")
    refused_forgery(engine, smtp.forge(b"235 2.7.0 Authentication successful\r\n"))
    smtp.server(b"535 5.7.8 Error: authentication failed\r\n")
    d = smtp.client(RELAY)
    assert d.verdict is DROP and [n.row for n in d.notices if n.event == "fail"] == [ROW_NOT_LOGGED_IN]


@FAMILIES
def test_a_forged_354_does_not_start_data_mode(client, server):
    """Believed, a forged 354 would make the gate read what follows as a body
    while the server, which refused DATA, reads it as commands."""
    engine = make_engine()
    smtp = conn(engine, client, server, 25)
    smtp.smtp_greeting()
    smtp.client(b"MAIL FROM:<alice@lab.example>\r\n")
    smtp.server(b"250 2.1.0 Ok\r\n")
    smtp.client(b"DATA\r\n")
    refused_forgery(engine, smtp.forge(b"354 End data with <CR><LF>.<CR><LF>\r\n"))
    smtp.server(b"554 5.5.1 Error: no valid recipients\r\n")
    d = smtp.client(b"RCPT TO:<dave@external.example>\r\n")
    assert d.verdict is DROP and [n.event for n in d.notices] == ["fail"]


@FAMILIES
def test_a_forged_220_to_starttls_does_not_take_the_flow_out_of_inspection(client, server):
    engine = make_engine(smtp_starttls="relay-clients", trusted_networks=[])
    smtp = conn(engine, client, server, 25)
    smtp.smtp_greeting()
    engine.logins.add(client, "alice", smtp.now, 600)  # may use TLS
    smtp.client(b"STARTTLS\r\n")
    refused_forgery(engine, smtp.forge(b"220 2.0.0 Ready to start TLS\r\n"))
    assert engine.flows.get((client, smtp.cport, server, 25)).app.fate is Fate.INSPECTED


@FAMILIES
def test_a_forged_syn_ack_does_not_open_the_flow(client, server):
    engine = make_engine()
    smtp = conn(engine, client, server, 25)
    assert smtp.feed(smtp.packet(True, flags="S", ack=0), True).verdict is ACCEPT
    smtp.cseq += 1
    refused_forgery(engine, smtp.forge(b"", flags="SA"))
    # The real handshake goes on.
    assert smtp.feed(smtp.packet(False, flags="SA"), False).verdict is ACCEPT


@FAMILIES
def test_a_client_packet_arriving_from_the_server_side_is_dropped(client, server):
    engine = make_engine()
    smtp = conn(engine, client, server, 25)
    smtp.smtp_greeting()
    d = smtp.feed(smtp.packet(True, RELAY), from_client_side=False)
    refused_forgery(engine, d)


@FAMILIES
def test_with_ingress_known_a_whole_login_and_relay_pass(client, server):
    engine = make_engine()
    pop = conn(engine, client, server, 110)
    assert pop.pop3_login(b"alice").verdict is BYPASS
    smtp = Conn(engine, client=client, server=server, ingress=True, now=pop.now)
    smtp.smtp_greeting()
    d = smtp.client(RELAY)
    assert d.verdict is ACCEPT and [n.event for n in d.notices] == ["pass"]
    assert engine.counters["wrong_direction"] == 0


def test_a_client_may_pick_a_mail_port_as_its_source_port():
    """Ingress decides: a client on source port 110 talking SMTP is SMTP."""
    engine = make_engine()
    smtp = Conn(engine, cport=110, sport=25, ingress=True)
    smtp.smtp_greeting()
    d = smtp.client(RELAY)
    assert d.verdict is DROP and [n.event for n in d.notices] == ["fail"]
    assert engine.counters["wrong_direction"] == 0
