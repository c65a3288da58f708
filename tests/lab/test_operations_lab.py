"""Operations on the live gate: the metrics endpoint scraped while mail
flows, and `sapd-nfq why` with and without a daemon."""

from __future__ import annotations

import json
import urllib.request

import pytest
from lab_gate import pop3_login, send_mail, try_rcpt, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.lab

LISTEN = "127.0.0.1:9925"
LOCAL, EXTERNAL = "alice@lab.example", "dave@external.example"


def scrape(lab) -> dict:
    with lab.inside("gw"):
        text = urllib.request.urlopen(f"http://{LISTEN}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def traffic(lab, mail_server, make_gate, fresh):
    """A login and a relay that passes, inbound mail, a relay refused."""
    gate = make_gate("forward", metrics_listen=LISTEN)
    logged, inbound, stranger = fresh(), fresh(), fresh()
    server = lab.server.ipv4
    pop3_login(lab, mail_server, logged, server)
    assert send_mail(lab, logged, server, LOCAL, EXTERNAL, "row 2") is None
    assert send_mail(lab, inbound, server, "ext@external.example", "bob@lab.example", "row 1") is None
    refused = try_rcpt(lab, stranger, server, LOCAL, EXTERNAL)
    assert refused is not None and refused.code == 550
    gate.wait_for_log(r"FAIL client=.* row='row 3")
    return gate, logged, stranger


def test_each_metric_counts_what_the_traffic_made(lab, traffic):
    got = scrape(lab)
    row = {key[1][0][1][:5]: value for key, value in got.items() if key[0] == "sapd_nfq_decisions_total"}
    assert row == {"row 2": 1, "row 1": 1, "row 3": 1}
    assert got["sapd_nfq_logins_total", (("source", "pop3"),)] == 1
    assert got["sapd_nfq_refusals_total", (("reason", "relay_denied"),)] == 1
    assert got["sapd_nfq_refusals_total", (("reason", "wrong_direction"),)] == 0
    assert got["sapd_nfq_worker_up", (("queue", "0"),)] == 1
    packets = sum(v for k, v in got.items() if k[0] == "sapd_nfq_packets_total")
    assert packets > 0 and got["sapd_nfq_engine_seconds_count", ()] == packets
    assert got["sapd_nfq_logins_held", ()] == 1
    assert got["sapd_nfq_kernel_queue_dropped_total", (("queue", "0"),)] == 0
    assert got["sapd_nfq_reloads_total", ()] == 0
    # More traffic, larger counters: the endpoint reads live numbers.
    before = packets
    assert try_rcpt(lab, traffic[2], lab.server.ipv4, LOCAL, EXTERNAL).code == 550
    got = wait_until(lambda: (g := scrape(lab))["sapd_nfq_refusals_total", (("reason", "relay_denied"),)] == 2
                     and g, 10, "the second refusal in the metrics")
    assert sum(v for k, v in got.items() if k[0] == "sapd_nfq_packets_total") > before


def test_why_tells_the_login_and_the_last_decisions(lab, traffic):
    gate, logged, stranger = traffic
    out = gate.cli("why", logged).stdout
    assert f"{logged}: logged in as alice via pop3 until" in out, out
    assert f"PASS <{LOCAL}> -> <{EXTERNAL}>  row 2" in out, out
    out = gate.cli("why", stranger).stdout
    assert f"{stranger}: not logged in; no login seen since the daemon started" in out, out
    assert f"FAIL <{LOCAL}> -> <{EXTERNAL}>  row 3" in out and "no login from" in out, out
    why = json.loads(gate.cli("why", stranger, "--json").stdout)
    assert why["daemon"] and why["login"] is None and [d["verdict"] for d in why["decisions"]] == ["FAIL"]
    gate.stop()
    out = gate.cli("why", logged).stdout
    assert out.startswith("no daemon running: from the login store alone"), out
    assert f"{logged}: logged in as alice via pop3 until" in out, out
