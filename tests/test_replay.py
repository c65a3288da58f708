"""Replays of real sessions (tests/captures, recorded in the lab with Postfix,
Dovecot, swaks, curl, poplib and raw clients) through the engine and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from sapd_nfq import cli
from sapd_nfq.admin.pcap import read_packets
from sapd_nfq.engine.core import Engine
from sapd_nfq.engine.logins import MemoryLoginStore
from sapd_nfq.engine.policy import ROW_LOGGED_IN, ROW_NOT_LOCAL, ROW_NOT_LOGGED_IN, ROW_RECIPIENT_LOCAL
from sapd_nfq.engine.verdicts import DROP
from sapd_nfq.lab.mail import VIRTUSERTABLE
from sapd_nfq.wiring.build import load_policy
from sapd_nfq.wiring.config import Config

CAPTURES = Path(__file__).parent / "captures"
CLIENT4, CLIENT6 = "198.18.1.2", "2001:db8:1::2"


def replay(name: str, logged_in: tuple[str, ...] = (), **config):
    """(notices, verdicts) of the engine over a capture. The MTA in the
    captures answered the commands as sent, so whole sessions are refused
    unless `refusal="recipient"` is asked for."""
    config = {"refusal": "session", **config}
    cfg = replace(Config.default(), virtusertable=VIRTUSERTABLE, state="memory", **config)
    logins = MemoryLoginStore()
    engine = Engine(cfg, load_policy(cfg, logins), logins)
    notices, verdicts = [], []
    with open(CAPTURES / f"{name}.pcap", "rb") as f:
        for stamp, packet, wire_len in read_packets(f):
            for address in logged_in:
                if not logins.is_logged_in(address, stamp):
                    logins.add(address, None, stamp, cfg.auth_ttl, source="manual")
            decision = engine.handle(packet, stamp, wire_len)
            notices += decision.notices
            verdicts.append(decision.verdict)
    return notices, verdicts


def decisions(notices):
    return [(n.event, n.recipient, n.row) for n in notices if n.event in ("pass", "fail")]


def logins(notices):
    return [(n.client, n.user) for n in notices if n.event == "login"]


def test_inbound_mail_to_a_local_recipient():
    notices, _ = replay("smtp_inbound_local")
    assert decisions(notices) == [("pass", "alice@lab.example", ROW_RECIPIENT_LOCAL)]


def test_a_refused_recipient_the_mta_answered_250_falls_back_to_the_session_refusal():
    # The capture's MTA relayed for the lab and saw the RCPT as sent: had the
    # gate rewritten it into an unknown verb, a 250 would mean the MTA took
    # the rewritten command.
    notices, verdicts = replay("smtp_pipelining", refusal="recipient", mta="other")
    assert decisions(notices)[1] == ("fail", "erin@external.example", ROW_NOT_LOCAL)
    assert [n.reason for n in notices if n.event == "reset"] == [
        "the MTA accepted the command a refused RCPT became"]
    assert verdicts[-1] is DROP


def test_local_sender_to_external_fails_without_login_and_passes_with_one():
    notices, verdicts = replay("smtp_local_to_external")
    assert decisions(notices) == [("fail", "dave@external.example", ROW_NOT_LOGGED_IN)]
    assert DROP in verdicts
    notices, verdicts = replay("smtp_local_to_external", logged_in=(CLIENT4,))
    assert decisions(notices) == [("pass", "dave@external.example", ROW_LOGGED_IN)]
    assert DROP not in verdicts


@pytest.mark.parametrize("logged_in", [(), (CLIENT4,)])
def test_external_to_external_always_fails(logged_in):
    notices, _ = replay("smtp_external_relay", logged_in)
    assert decisions(notices) == [("fail", "erin@external.example", ROW_NOT_LOCAL)]


def test_pop3_logins_user_pass_and_auth_plain():
    assert logins(replay("pop3_user_pass")[0]) == [(CLIENT4, "alice")]
    assert logins(replay("pop3_auth_plain")[0]) == [(CLIENT4, "bob")]


def test_no_password_reaches_a_notice():
    for name in ("pop3_user_pass", "pop3_auth_plain", "pop3_failed_login"):
        for notice in replay(name)[0]:
            assert "lab-pw" not in repr(notice)


def test_failed_pop3_login_learns_nothing():
    notices, _ = replay("pop3_failed_login")
    assert logins(notices) == []
    assert [n.event for n in notices] == ["login-failed"]


def test_split_rcpt_is_judged_once_reassembled():
    notices, _ = replay("smtp_rcpt_split")
    assert decisions(notices) == [("fail", "dave@external.example", ROW_NOT_LOCAL)]


def test_pipelined_burst_is_judged_recipient_by_recipient():
    notices, _ = replay("smtp_pipelining")
    assert decisions(notices) == [
        ("pass", "alice@lab.example", ROW_RECIPIENT_LOCAL),
        ("fail", "erin@external.example", ROW_NOT_LOCAL),
    ]


def test_rcpt_after_a_refused_data_is_still_judged():
    notices, _ = replay("smtp_data_refused")
    assert decisions(notices) == [("fail", "erin@external.example", ROW_NOT_LOCAL)]


def test_a_body_full_of_commands_is_text():
    notices, verdicts = replay("smtp_body_commands")
    assert decisions(notices) == [("pass", "alice@lab.example", ROW_RECIPIENT_LOCAL)]
    assert DROP not in verdicts


def test_bdat_chunks_are_skipped_by_count():
    notices, _ = replay("smtp_bdat")
    assert decisions(notices) == [
        ("pass", "alice@lab.example", ROW_RECIPIENT_LOCAL),
        ("fail", "erin@external.example", ROW_NOT_LOCAL),
    ]


def test_ipv6_relay_and_login():
    notices, _ = replay("smtp_ipv6_relay")
    assert decisions(notices) == [("fail", "erin@external.example", ROW_NOT_LOCAL)]
    assert [n.client for n in notices] == [CLIENT6]
    assert logins(replay("pop3_ipv6_login")[0]) == [(CLIENT6, "bob")]


def test_starttls_session_is_refused_under_the_strip_policy():
    # The recording was made without the gate: the client saw the offer and
    # asked. Under "strip" that request is refused before the server sees it.
    notices, verdicts = replay("smtp_starttls")
    assert [n.event for n in notices] == ["tls"]
    assert DROP in verdicts and decisions(notices) == []


def test_starttls_session_under_relay_clients_policy():
    notices, _ = replay("smtp_starttls", smtp_starttls="relay-clients")
    assert [n.event for n in notices] == ["tls"] and "STARTTLS not allowed" in notices[0].reason
    notices, verdicts = replay("smtp_starttls", logged_in=(CLIENT4,), smtp_starttls="relay-clients")
    assert [n.event for n in notices] == ["tls"] and "no longer inspected" in notices[0].reason
    assert DROP not in verdicts


def test_pop3_stls_is_allowed_and_learns_nothing():
    notices, verdicts = replay("pop3_stls")
    assert logins(notices) == [] and [n.event for n in notices] == ["tls"]
    assert DROP not in verdicts


def test_login_then_relay_in_one_capture():
    notices, _ = replay("pop3_then_smtp_relay")
    assert logins(notices) == [(CLIENT4, "alice")]
    assert decisions(notices) == [("pass", "dave@external.example", ROW_LOGGED_IN)]


def test_failed_login_then_relay_in_one_capture():
    notices, _ = replay("pop3_failed_then_smtp_relay")
    assert decisions(notices) == [("fail", "dave@external.example", ROW_NOT_LOGGED_IN)]


def test_every_capture_replays_without_an_error_or_a_malformed_packet():
    for path in sorted(CAPTURES.glob("*.pcap")):
        cfg = replace(Config.default(), virtusertable=VIRTUSERTABLE, state="memory")
        store = MemoryLoginStore()
        engine = Engine(cfg, load_policy(cfg, store), store)
        with open(path, "rb") as f:
            for stamp, packet, wire_len in read_packets(f):
                notices = engine.handle(packet, stamp, wire_len).notices
                assert all(n.event != "error" for n in notices), (path.name, notices)
        for counter in ("malformed", "truncated", "untracked", "conflicts", "protocol_errors"):
            assert engine.counters[counter] == 0, (path.name, counter)


def test_replay_command_prints_json_lines(tmp_path, capsys):
    config = tmp_path / "sapd-nfq.toml"
    config.write_text(f'virtusertable = "{VIRTUSERTABLE}"\nstate = "memory"\n')
    code = cli.main(["replay", str(CAPTURES / "pop3_then_smtp_relay.pcap"), "--json",
                     "--config", str(config)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["event"], line["client"]) for line in lines] == [
        ("login", CLIENT4), ("pass", CLIENT4), ("queued", CLIENT4)]
    assert lines[0]["user"] == "alice"
    assert (lines[1]["sender"], lines[1]["recipient"]) == ("alice@lab.example", "dave@external.example")
    # the session's decision and the MTA's queue id, tied by both ends' addresses and ports
    ends = ("client", "client_port", "server", "server_port")
    assert [lines[1][k] for k in ends] == [lines[2][k] for k in ends] == [CLIENT4, 40176, "198.18.2.2", 25]
    assert lines[2]["queue_id"] == "CD9501626F2"  # Postfix's `250 2.0.0 Ok: queued as CD9501626F2`


# --- IMAP ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, user", [("imap_login", "alice"), ("imap_authenticate_plain", "bob"),
                                        ("imap_literal_login", "alice")])
def test_imap_logins(name, user):
    notices, _ = replay(name)
    assert logins(notices) == [(CLIENT4, user)]
    assert not [n for n in notices if n.event == "error"]


def test_imap_ipv6_login():
    assert logins(replay("imap_ipv6_login")[0]) == [(CLIENT6, "bob")]


def test_imap_failed_login_and_starttls_learn_nothing():
    notices, _ = replay("imap_failed_login")
    assert logins(notices) == [] and [n.event for n in notices] == ["login-failed"]
    notices, _ = replay("imap_starttls")
    assert logins(notices) == [] and [n.event for n in notices] == ["tls"]


def test_imap_starttls_stripped_on_request():
    notices, verdicts = replay("imap_starttls", imap_starttls="strip")
    assert [n.event for n in notices] == ["tls"] and DROP in verdicts
    assert "STARTTLS not allowed" in notices[0].reason


def test_imap_login_then_relay_passes():
    notices, _ = replay("imap_then_smtp_relay")
    assert logins(notices) == [(CLIENT4, "alice")]
    assert decisions(notices) == [("pass", "dave@external.example", ROW_LOGGED_IN)]


def test_no_imap_password_reaches_a_notice():
    for name in ("imap_login", "imap_authenticate_plain", "imap_literal_login", "imap_failed_login"):
        for notice in replay(name)[0]:
            assert "lab-pw" not in repr(notice)
