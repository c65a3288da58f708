"""The gate reads a Postfix site's own recipient maps, live.

The gate runs beside Postfix (mode "input", in the server namespace:
postmap checks main.cf's `inet_interfaces` against the host it runs on)
and has no virtusertable: it reads the lab Postfix's
`virtual_mailbox_maps` (a texthash map) with the lab Postfix's own
configuration directory (its `recipient_delimiter = +`), and a hash map
made for the test, which it re-reads when `postmap` rebuilds it.
"""

from __future__ import annotations

import re

import pytest
from lab_gate import pop3_login, send_mail, swaks, try_rcpt

pytestmark = pytest.mark.lab

EXTERNAL = "ext@external.example"


@pytest.fixture
def postfix_conf(mail_server):
    return mail_server.state_dir / "postfix"


@pytest.fixture
def extra_map(lab, tmp_path, postfix_conf):
    """A hash map the test can change, rebuilt with postmap like an administrator does."""
    source = tmp_path / "extra"

    def write(text: str) -> None:
        source.write_text(text)
        lab.run("server", ["postmap", "-c", str(postfix_conf), f"hash:{source}"])
    write("erin@extra.example erin\n")
    return source, write


@pytest.fixture
def gate(make_gate, postfix_conf, extra_map):
    return make_gate("input", virtusertable="", postfix_config_directory=str(postfix_conf),
                     postfix_maps=[f"texthash:{postfix_conf}/vmailbox", f"hash:{extra_map[0]}"])


def test_mail_to_a_recipient_in_postfixs_map_is_delivered(lab, mail_server, gate, fresh):
    source = fresh()
    before = len(mail_server.wait_for_mail("alice", 0))
    done = swaks(lab, source, lab.server.ipv4, EXTERNAL, "alice+lists@lab.example", "by-map")
    assert done.returncode == 0 and "250 2.0.0 Ok: queued" in done.stdout, done.stdout
    mail_server.wait_for_mail("alice", before + 1)
    gate.wait_for_log(rf"PASS client={re.escape(source)} .*recipient='alice\+lists@lab.example' row='row 1")


def test_the_relay_table_with_postfixs_maps(lab, mail_server, gate, fresh):
    source, server = fresh(), lab.server.ipv4
    refused = try_rcpt(lab, source, server, "alice@lab.example", "dave@external.example")
    assert refused is not None and refused.code == 550, refused  # row 3: sender local by the map
    gate.wait_for_log(rf"FAIL client={re.escape(source)} .* row='row 3")
    pop3_login(lab, mail_server, source, server)
    assert send_mail(lab, source, server, "bob@lab.example", "dave@external.example", "row 2") is None
    refused = try_rcpt(lab, source, server, EXTERNAL, "dave@external.example")
    assert refused is not None and refused.code == 550, refused  # row 4


def test_a_rebuilt_map_is_read_again_and_a_broken_one_keeps_the_old(lab, mail_server, gate, fresh,
                                                                    extra_map):
    source, write = extra_map
    client = fresh()
    assert try_rcpt(lab, client, lab.server.ipv4, EXTERNAL, "frank@extra.example").code == 550
    write("erin@extra.example erin\nfrank@extra.example frank\n")
    gate.wait_for_log(r"reloaded \(file changed\)", timeout=15)
    # The gate now passes frank (row 1), and the lab Postfix takes him.
    assert try_rcpt(lab, client, lab.server.ipv4, EXTERNAL, "frank@extra.example") is None
    gate.wait_for_log(rf"PASS client={re.escape(client)} .*recipient='frank@extra.example' row='row 1")
    lines = len(gate.log_lines())
    (source.parent / "extra.db").unlink()
    gate.wait_for_log(r"reload \(file changed\) failed, keeping the running config and table: "
                      r".*extra\.db", timeout=15, after=lines)
    assert try_rcpt(lab, client, lab.server.ipv4, EXTERNAL, "frank@extra.example") is None
    gate.wait_for_log(rf"PASS client={re.escape(client)} .*recipient='frank@extra.example' row='row 1",
                      after=lines)
