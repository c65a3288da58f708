"""What `why` and the metrics endpoint are made of: the per-client memory,
the worker's tallies, and the metric families rendered from a status."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from statuses import WORKER

from sapd_nfq.admin import metrics
from sapd_nfq.admin.recent import DECISIONS_KEPT, Recent
from sapd_nfq.admin.report import GateStatus, QueueStatus, ReceiveStatus, WorkerStatus, load
from sapd_nfq.admin.stats import ENGINE_BUCKETS, Stats
from sapd_nfq.engine.verdicts import ACCEPT, DROP, Decision, Notice, carried
from sapd_nfq.kernel.rules import GUARD, PORT_GUARD
from sapd_nfq.wiring import logsetup

PASS = Notice("pass", "198.18.3.10", sender="alice@lab.example", recipient="dave@external.example",
              row="row 2: ...", reason="alice at 198.18.3.10 via pop3", time=100.0)
FAIL = Notice("fail", "::ffff:198.18.3.11", sender="alice@lab.example", recipient="x@external.example",
              row="row 3: ...", reason="no login", time=101.0)
LOGIN = Notice("login", "198.18.3.10", user="alice", reason="pop3 USER", time=90.0)


def test_recent_keeps_decisions_and_logins_per_client():
    recent = Recent()
    for notice in (LOGIN, PASS, FAIL, Notice("reset", "198.18.3.10", reason="x")):
        recent.note(notice, auth_ttl=600)
    assert recent.about("198.18.3.10") == {
        "logins": [{"time": 90.0, "user": "alice", "source": "pop3", "expires": 690.0}],
        "decisions": [{"time": 100.0, "verdict": "PASS", "sender": "alice@lab.example",
                       "recipient": "dave@external.example", "row": "row 2: ...",
                       "reason": "alice at 198.18.3.10 via pop3"}]}
    assert recent.about("198.18.3.11")["decisions"][0]["verdict"] == "FAIL"  # addresses normalised
    assert recent.about("198.18.3.12") == {"decisions": [], "logins": []}


def test_recent_is_bounded():
    recent = Recent(clients=3)
    for _ in range(DECISIONS_KEPT + 5):
        recent.note(PASS, auth_ttl=1)
    assert len(recent.about("198.18.3.10")["decisions"]) == DECISIONS_KEPT
    for i in range(10):
        recent.note(Notice("fail", f"198.18.3.{20 + i}", row="r", time=i), auth_ttl=1)
    assert len(recent) == 3 and recent.about("198.18.3.29")["decisions"]


def test_an_smtp_auth_login_is_no_window_for_the_address():
    recent = Recent()
    recent.note(Notice("login", "198.18.3.10", user="bob", reason="smtp-auth PLAIN"), auth_ttl=600)
    assert recent.about("198.18.3.10")["logins"] == []


def test_stats_tally_verdicts_rows_sources_and_time():
    stats = Stats()
    stats.record(Decision(ACCEPT, notices=(PASS, LOGIN,)), 3e-6)
    stats.record(Decision(DROP, notices=(FAIL,)), 2e-3)
    assert stats.verdicts == {"accept": 1, "drop": 1}
    assert stats.rows == {"pass|row 2: ...": 1, "fail|row 3: ...": 1}
    assert stats.logins == {"pop3": 1}
    histogram = stats.histogram()
    assert sum(histogram.buckets) == 2
    assert histogram.buckets[0] == 1  # 3 us is under the first bound
    assert len(histogram.buckets) == len(ENGINE_BUCKETS) + 1


def test_the_worker_adds_its_own_counts_to_the_engines():
    stats = Stats()
    stats.counted["engine_errors"] += 1
    stats.counted["logins"] += 2
    engine = Counter(packets=5, logins=1)
    assert stats.counters(engine) == {"packets": 5, "logins": 3, "engine_errors": 1}
    assert engine == Counter(packets=5, logins=1)


#: the keys of a worker's answer to `status`, as `status --json` shows them
STATUS_KEYS = [
    "ok", "pid", "started", "queue", "mode", "config", "virtusertable", "postfix_maps",
    "virtusertable_entries", "flows_tracked", "flows_evicted", "logins_held", "logins_by_source",
    "store", "decisions", "counters", "retained_bytes", "reloads", "reload_errors", "login_logs",
    "last_reload_error", "verdicts", "rows", "logins", "engine_seconds", "receive", "enforce", "would_refuse",
    "engine"]


def test_a_worker_status_crosses_the_control_socket_whole():
    sent = json.loads(json.dumps(WORKER.as_json()))
    assert list(sent) == STATUS_KEYS
    assert list(sent["login_logs"]) == ["files", "lines", "logins", "sessions"]
    assert list(sent["engine_seconds"]) == ["buckets", "sum", "bounds"]
    assert sent["receive"] == {"gso": True, "overruns": 0, "cut": 0, "batches": 3, "verdict_errors": 1}
    assert WorkerStatus.from_json(sent) == WORKER
    assert WorkerStatus.from_json({**sent, "login_logs": None}).login_logs is None


def test_a_field_with_a_default_may_be_missing_from_the_answer():
    """A command reads a worker that does not send a newer field yet."""

    @dataclass(frozen=True)
    class Newer:
        pid: int
        added: int = 0

    assert load(Newer, {"pid": 7}) == Newer(7)
    assert load(Newer, {"pid": 7, "added": 3}) == Newer(7, 3)


def test_status_json_shows_each_queue_running_or_not():
    status = GateStatus({"ipv4": {"installed": True}},
                        (QueueStatus(0, WORKER, {"waiting": 0}), QueueStatus(1, None, None, error="no daemon")),
                        logins_held=1, logins_by_source={"pop3": 1})
    shown = status.as_json()
    assert list(shown) == ["rules", "rules_installed", "daemon_running", "workers", "logins_held",
                           "logins_by_source", "blind"]
    assert shown["blind"] == []
    running, stopped = shown["workers"]
    assert list(running) == [*STATUS_KEYS, "running", "kernel"] and running["running"] is True
    assert stopped == {"running": False, "queue": 1, "error": "no daemon", "kernel": None}
    assert (shown["rules_installed"], shown["daemon_running"]) == (True, False)


class _Fixed(Collector):
    def __init__(self, status):
        self.status = status

    def collect(self):
        return metrics.render(self.status)


def scrape(status) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(status))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def queue_status(queue: int, accepted: int) -> QueueStatus:
    stats = Stats()
    for _ in range(accepted):
        stats.record(Decision(ACCEPT, notices=(PASS,)), 1e-5)
    worker = replace(WORKER, queue=queue, counters={"fail": 2, "wrong_direction": 1},
                     flows_tracked=3, retained_bytes=10, reloads=1,
                     verdicts=dict(stats.verdicts), rows=dict(stats.rows), logins=dict(stats.logins),
                     engine_seconds=stats.histogram(),
                     store={"connected": queue == 0, "pending_writes": queue, "write_errors": 1,
                            "dropped_writes": 0},
                     receive=ReceiveStatus(gso=queue == 0, overruns=2, cut=0, batches=10 + queue,
                                           verdict_errors=queue))
    return QueueStatus(queue, worker, {"queue_dropped": 4, "user_dropped": 0})


def test_metrics_sum_the_workers():
    status = GateStatus({"ipv4": {"rules": [{"chain": GUARD, "rule": "-m rpfilter --invert -j DROP", "packets": 7},
                                           {"chain": PORT_GUARD, "rule": "-j CONNMARK --set-xmark 0x2000/0x2000",
                                            "packets": 5},
                                           {"chain": PORT_GUARD, "rule": "-m connmark -j DROP", "packets": 2}],
                                  "smtp_opens": {"host": 9, "queued": 0}}},
                        (queue_status(0, 2), queue_status(1, 3), QueueStatus(2, None, None)),
                        logins_held=5,
                        blind=("ipv4: 9 SMTP connections opened through this host ..., none of them into the queue",))
    got = scrape(status)
    assert got["sapd_nfq_packets_total", (("verdict", "accept"),)] == 5
    assert got["sapd_nfq_decisions_total", (("row", "row 2: ..."), ("verdict", "PASS"))] == 5
    assert got["sapd_nfq_refusals_total", (("reason", "relay_denied"),)] == 4
    assert got["sapd_nfq_refusals_total", (("reason", "wrong_direction"),)] == 2
    assert got["sapd_nfq_worker_up", (("queue", "2"),)] == 0
    assert got["sapd_nfq_flows", ()] == 6 and got["sapd_nfq_logins_held", ()] == 5
    assert got["sapd_nfq_kernel_queue_dropped_total", (("queue", "1"),)] == 4
    assert got["sapd_nfq_spoofs_dropped_total", (("family", "ipv4"),)] == 9
    assert got["sapd_nfq_smtp_opens_total", (("family", "ipv4"), ("where", "host"))] == 9
    assert got["sapd_nfq_smtp_opens_total", (("family", "ipv4"), ("where", "queued"))] == 0
    assert got["sapd_nfq_blind", ()] == 1
    assert got["sapd_nfq_store_connected", (("queue", "1"),)] == 0
    assert got["sapd_nfq_store_pending_writes", ()] == 1 and got["sapd_nfq_store_errors_total", ()] == 2
    assert got["sapd_nfq_engine_seconds_count", ()] == 5
    assert got["sapd_nfq_receive_overruns_total", ()] == 4
    assert got["sapd_nfq_verdict_batches_total", ()] == 21 and got["sapd_nfq_verdict_errors_total", ()] == 1
    assert got["sapd_nfq_queue_gso", (("queue", "0"),)] == 1
    assert got["sapd_nfq_queue_gso", (("queue", "1"),)] == 0
    assert got["sapd_nfq_engine_seconds_bucket", (("le", "1e-05"),)] == 5


def test_monitor_mode_counts_would_be_refusals_by_row_and_reason():
    stats = Stats()
    refused = Decision(DROP, inject=(b"550",), notices=(FAIL,), reason="relay_denied")
    stats.record(carried(refused, False), 1e-5, enforce=False)
    stats.record(carried(Decision(DROP, reason="held_back"), False), 1e-5, enforce=False)
    stats.record(refused, 1e-5)  # enforcing: a refusal carried out is no would-be one
    watching = replace(queue_status(0, 0).worker, enforce=False, rows=dict(stats.rows),
                       would_refuse=dict(stats.would_refuse))
    status = GateStatus({}, (QueueStatus(0, watching, None), queue_status(1, 0)), logins_held=0)
    got = scrape(status)
    assert got["sapd_nfq_enforcing", (("queue", "0"),)] == 0
    assert got["sapd_nfq_enforcing", (("queue", "1"),)] == 1
    assert got["sapd_nfq_decisions_total", (("row", "row 3: ..."), ("verdict", "WOULD-FAIL"))] == 1
    assert got["sapd_nfq_decisions_total", (("row", "row 3: ..."), ("verdict", "FAIL"))] == 1
    assert got["sapd_nfq_would_refuse_total", (("reason", "relay_denied"),)] == 1
    assert got["sapd_nfq_would_refuse_total", (("reason", "held_back"),)] == 1
    assert stats.verdicts == {"accept": 2, "drop": 1}


def test_why_keeps_would_be_refusals_beside_decisions():
    recent = Recent()
    recent.note(replace(FAIL, event="would-fail"), 1800)
    assert [d["verdict"] for d in recent.about(FAIL.client)["decisions"]] == ["WOULD-FAIL"]


# --- where the daemon's lines go ---------------------------------------------------

class Syslog(logging.NullHandler):
    """SysLogHandler without the socket."""

    LOG_MAIL = logging.handlers.SysLogHandler.LOG_MAIL

    def __init__(self, **_kwargs: object) -> None:
        super().__init__()


@pytest.mark.parametrize("syslog, journal, handlers", [
    (True, "stderr", ["Syslog"]),                        # systemd: the journal gets one copy
    (True, None, ["Syslog", "StreamHandler"]),           # a terminal, with a syslog
    (True, "another", ["Syslog", "StreamHandler"]),      # a journal stream, not stderr
    (False, "stderr", ["StreamHandler"]),                # no syslog: stderr is all there is
])
def test_under_systemd_a_line_reaches_the_journal_once(monkeypatch, tmp_path, syslog, journal, handlers):
    err = (tmp_path / "stderr").open("w")
    monkeypatch.setattr(sys, "stderr", err)
    st = os.fstat(err.fileno())
    named = {"stderr": f"{st.st_dev}:{st.st_ino}", "another": f"{st.st_dev}:{st.st_ino + 1}"}
    if journal is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", named[journal])
    monkeypatch.setattr(logsetup.os.path, "exists", lambda path: syslog and path == "/dev/log")
    monkeypatch.setattr(logsetup.logging.handlers, "SysLogHandler", Syslog)
    logger = logging.getLogger(logsetup.LOGGER)
    monkeypatch.setattr(logger, "handlers", [])  # setup_logging's changes, undone after
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    for switch in ("_srcfile", "logThreads", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, getattr(logging, switch))
    assert [type(h).__name__ for h in logsetup.setup_logging().handlers] == handlers
    err.close()
