"""The decision log's line: one event a line, `key=value` pairs that split
exactly, both ends' addresses and ports, values quoted where they must be."""

from __future__ import annotations

import ast
import re

from sapd_nfq.engine.verdicts import Notice

PAIR = re.compile(r" (\w+)=('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s'\"=\\]+)")


def parse(line: str) -> tuple[str, dict[str, str]]:
    """A log line as the documentation describes it: EVENT, then key=value pairs."""
    event, rest = line.split(" ", 1)
    rest = " " + rest
    pairs = PAIR.findall(rest)
    assert "".join(f" {k}={v}" for k, v in pairs) == rest, line  # nothing left over
    return event, {k: ast.literal_eval(v) if v[0] in "'\"" else v for k, v in pairs}


def test_a_decision_line_carries_both_ends_in_order():
    notice = Notice("fail", "2001:db8:3::a", "2001:db8:2::2", client_port=40312, server_port=25,
                    sender="", recipient="dave@external.example",
                    row="row 3: sender local, recipient not local, client not logged in",
                    reason="no login")
    line = str(notice)
    assert line.startswith("FAIL client=2001:db8:3::a client_port=40312 server=2001:db8:2::2 "
                           "server_port=25 sender='' recipient='dave@external.example' row='row 3: ")
    assert parse(line) == ("FAIL", {
        "client": "2001:db8:3::a", "client_port": "40312", "server": "2001:db8:2::2",
        "server_port": "25", "sender": "", "recipient": "dave@external.example",
        "row": notice.row, "reason": "no login"})


def test_the_queued_line_names_the_mtas_queue_id():
    line = str(Notice("queued", "198.18.1.2", "198.18.2.2", client_port=40176, server_port=25,
                      sender="alice@lab.example", queue_id="CD9501626F2"))
    assert line == ("QUEUED client=198.18.1.2 client_port=40176 server=198.18.2.2 server_port=25 "
                    "sender='alice@lab.example' queue_id=CD9501626F2")


def test_hostile_values_stay_one_event_of_exact_pairs():
    for user in ("a\nFAIL client=1.2.3.4 row=x", "x' row='y", 'q"uote', "back\\slash", "a=b", " ", ""):
        line = str(Notice("login", "198.18.1.2", user=user, reason="pop3 USER"))
        assert "\n" not in line and "\r" not in line
        event, fields = parse(line)
        assert event == "LOGIN" and fields.get("user", "") == user  # an empty one is left out
        assert fields["reason"] == "pop3 USER" and "row" not in fields


def test_a_learned_login_has_no_server_and_no_ports():
    assert str(Notice("login", "198.18.1.2", user="alice", reason="hook")) == \
        "LOGIN client=198.18.1.2 user=alice reason=hook"
